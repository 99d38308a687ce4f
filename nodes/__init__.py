"""The ComfyUI adapter: thin node classes (Z-Image and GLM-Image), imported only inside ComfyUI."""
from . import glm_image, runtime, zimage

NODE_CLASS_MAPPINGS: dict = {**zimage.NODE_CLASS_MAPPINGS, **glm_image.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS: dict = {**zimage.NODE_DISPLAY_NAME_MAPPINGS, **glm_image.NODE_DISPLAY_NAME_MAPPINGS}

# ComfyUI's "Unload models" / "Free memory" (POST /free) and its out-of-memory handling also stop our workers.
runtime.install_release_hook()
