"""ComfyUI node classes of the textmask pack."""

from .segments import NamedSegments, ReferringMask, SegmentEverything
from .text_mask import TextMask

NODE_CLASS_MAPPINGS = {
    "TextMask": TextMask,
    "SegmentEverything": SegmentEverything,
    "NamedSegments": NamedSegments,
    "ReferringMask": ReferringMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TextMask": "Text Mask",
    "SegmentEverything": "Segment Everything",
    "NamedSegments": "Named Segments",
    "ReferringMask": "Referring Mask",
}
