"""ComfyUI entry point: the node mappings, nothing else."""
try:
    import folder_paths  # noqa: F401  present only inside ComfyUI
except ImportError:  # imported as a plain package (CLI, tests, worker processes): no nodes
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
