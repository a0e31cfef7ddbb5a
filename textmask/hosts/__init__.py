"""Host adapters: one thin module per host (diffusers, comfy, a1111). Host imports stay inside them."""

from .base import Conditioning, Host

__all__ = ["Conditioning", "Host"]
