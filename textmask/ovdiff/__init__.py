"""OVDiff (Karazija et al.): open-vocabulary segmenters synthesised by the host model."""

from .prototypes import ClassPrototypes, Prototypes, Settings, build_prototypes, fingerprint, list_cache
from .segmentation import OVDiffResult, segment

__all__ = ["ClassPrototypes", "OVDiffResult", "Prototypes", "Settings", "build_prototypes", "fingerprint",
           "list_cache", "segment"]
