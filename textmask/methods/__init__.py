"""Segmentation methods: functions over captured attention and predicted noise."""

from .attention import CrossAttentionMaps, SelfAttentionAggregate, refine_with_self_attention
from .noise_diff import noise_difference

METHODS = ("attention", "noise-diff", "ld-znet")  # ld-znet also needs trained weights

__all__ = ["CrossAttentionMaps", "SelfAttentionAggregate", "refine_with_self_attention", "noise_difference", "METHODS"]
