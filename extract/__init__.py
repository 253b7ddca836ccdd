"""dpnet stage 1: frozen-CNN region descriptors, written once to a chunked cache."""

__version__ = "0.1.0"
