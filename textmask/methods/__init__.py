"""Segmentation methods: functions over captured attention and predicted noise."""

from .attention import CrossAttentionMaps, SelfAttentionAggregate, refine_with_self_attention
from .noise_diff import noise_difference

ZERO_SHOT_METHODS = ("attention", "noise-diff")
METHODS = (*ZERO_SHOT_METHODS, "ld-znet")  # ld-znet also needs trained weights

__all__ = ["CrossAttentionMaps", "SelfAttentionAggregate", "refine_with_self_attention", "noise_difference", "METHODS", "ZERO_SHOT_METHODS"]
