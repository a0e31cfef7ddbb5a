"""Choosing the adapter for the webui's loaded model: A1111's ldm/sgm model, Forge's backend, or Forge's first
release, whose ``forge_objects`` are ComfyUI's (served by the ComfyUI adapter)."""

from __future__ import annotations

from typing import Any

from ..errors import CaptureError


def webui_host(sd_model: Any):
    """The adapter for ``shared.sd_model``: Forge's patcher objects, or A1111's ldm/sgm model."""
    objects = getattr(sd_model, "forge_objects", None)
    if objects is not None and hasattr(getattr(objects.unet, "model", None), "predictor"):
        from .forge import ForgeFluxHost, ForgeHost, is_forge_flux  # Forge's own backend (since 2024-08): a KModel

        return ForgeFluxHost(sd_model) if is_forge_flux(sd_model) else ForgeHost(sd_model)
    if objects is not None:  # Forge's first release: ComfyUI's model management as ldm_patched
        try:
            from .comfy import ComfyHost
        except ImportError as e:
            raise CaptureError(f"this Forge version's model objects are not supported ({e})") from None
        return ComfyHost(objects.unet, objects.clip, objects.vae)
    from .a1111 import A1111Host

    return A1111Host(sd_model)
