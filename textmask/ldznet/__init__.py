"""LD-ZNet: the trained text-conditioned segmenter over VAE latents plus the host UNet's features."""

from .model import LDZNet, feature_positions, znet_config
from .weights import convert_reference, load_ldznet, save_ldznet

__all__ = ["LDZNet", "convert_reference", "feature_positions", "load_ldznet", "save_ldznet", "znet_config"]
