"""ComfyUI entry point of the textmask node pack (relative imports only: ComfyUI owns ``nodes``)."""

import importlib.util

# ComfyUI imports this folder as a package. pytest imports it too, as a plain module when the folder's name is not
# an identifier (a checkout called "comfyui-textmask"), where a relative import cannot work: no nodes then.
if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported outside ComfyUI (e.g. pytest collecting this folder as a package): no nodes
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
