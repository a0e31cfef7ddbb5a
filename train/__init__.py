"""LD-ZNet training, evaluation and data (PhraseCut, RefCOCO-format JSON); run as ``python -m train.<module>``."""
