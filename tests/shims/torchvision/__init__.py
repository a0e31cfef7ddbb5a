"""Test-only stand-in for torchvision, which has no CPU wheel for the torch these tests run on.

ComfyUI (a28a9dc) imports torchvision at module level only for Stable Cascade's EfficientNet and one
upscaler architecture; these tests use neither. Anything that would really call torchvision raises.
ComfyUI users have the real torchvision, which ComfyUI's requirements install.
"""

from . import models, transforms  # noqa: F401

__version__ = "0.0+textmask-test-shim"
