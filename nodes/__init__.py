"""The ComfyUI adapter: thin node classes (Z-Image and GLM-Image), imported only inside ComfyUI."""
from . import glm_image, lora, runtime, zimage, zimage_model

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _nodes in (zimage, zimage_model, lora, glm_image):
    NODE_CLASS_MAPPINGS.update(_nodes.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_nodes.NODE_DISPLAY_NAME_MAPPINGS)

# ComfyUI's "Unload models" / "Free memory" (POST /free) and its out-of-memory handling also stop our workers.
runtime.install_release_hook()
