"""GLM-Image and Z-Image split into stages. STAGES and LOADERS are what a runner (local or worker group) serves."""
from .glm_image import stages as _glm_image
from .zimage import comfyui_files as _zimage_files
from .zimage import comfyui_model as _zimage_comfyui
from .zimage import stages as _zimage

STAGES = {stage.name: stage for stage in (*_zimage.STAGES, _zimage_comfyui.PREDICT, *_glm_image.STAGES)}
LOADERS = {loader.name: loader for loader in (_zimage.LOADER, _zimage_files.LOADER, _zimage_comfyui.DIT_LOADER,
                                              _glm_image.LOADER)}
