"""ComfyUI node classes of the textmask pack."""

from .text_mask import TextMask

NODE_CLASS_MAPPINGS = {"TextMask": TextMask}
NODE_DISPLAY_NAME_MAPPINGS = {"TextMask": "Text Mask"}
