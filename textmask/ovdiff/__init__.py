"""OVDiff (Karazija et al.): open-vocabulary segmenters synthesised by the host model."""

from .prototypes import ClassPrototypes, Prototypes, Settings, build_prototypes, fingerprint, list_cache
from .segmentation import label


def segment(*args, **kwargs):
    """Deprecated name of ``label``."""
    import warnings

    warnings.warn("textmask.ovdiff.segment is now textmask.ovdiff.label", DeprecationWarning, stacklevel=2)
    return label(*args, **kwargs)


__all__ = ["ClassPrototypes", "Prototypes", "Settings", "build_prototypes", "fingerprint", "label", "list_cache", "segment"]
