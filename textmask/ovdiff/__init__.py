"""OVDiff (Karazija et al.): open-vocabulary segmenters synthesised by the host model."""

from .prototypes import ClassPrototypes, Prototypes, Settings, build_prototypes, fingerprint, list_cache
from .segmentation import label

__all__ = ["ClassPrototypes", "Prototypes", "Settings", "build_prototypes", "fingerprint", "label", "list_cache"]
