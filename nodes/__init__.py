"""ComfyUI node classes of the textmask pack."""

from .instances import TextMaskToSEGS
from .ldznet import LoadLDZNet, TextMaskLDZNet
from .ovdiff import OVDiffPrototypes, OVDiffSegment
from .referring import ReferringMask
from .sampling import TextMaskCapture, TextMaskFromSampling
from .segments import NamedSegments, SegmentEverything
from .text_mask import TextMask

NODE_CLASS_MAPPINGS = {
    "TextMask": TextMask,
    "SegmentEverything": SegmentEverything,
    "NamedSegments": NamedSegments,
    "ReferringMask": ReferringMask,
    "LoadLDZNet": LoadLDZNet,
    "TextMaskLDZNet": TextMaskLDZNet,
    "OVDiffPrototypes": OVDiffPrototypes,
    "OVDiffSegment": OVDiffSegment,
    "TextMaskToSEGS": TextMaskToSEGS,
    "TextMaskCapture": TextMaskCapture,
    "TextMaskFromSampling": TextMaskFromSampling,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TextMask": "Text Mask",
    "SegmentEverything": "Segment Everything",
    "NamedSegments": "Named Segments",
    "ReferringMask": "Referring Mask",
    "LoadLDZNet": "Load LD-ZNet",
    "TextMaskLDZNet": "Text Mask (LD-ZNet)",
    "OVDiffPrototypes": "OVDiff Prototypes",
    "OVDiffSegment": "OVDiff Segment",
    "TextMaskToSEGS": "Text Mask to SEGS",
    "TextMaskCapture": "Text Mask Capture",
    "TextMaskFromSampling": "Text Mask from Sampling",
}
