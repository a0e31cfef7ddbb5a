"""Host adapters, one module per host, each implementing the contract in ``contract``; host imports stay inside
them. ``select.webui_host`` picks the webui's adapter."""

from .contract import Conditioning, Geometry, Host, HostDefaults

__all__ = ["Conditioning", "Geometry", "Host", "HostDefaults"]
