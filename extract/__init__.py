"""dpnet stage 1: frozen-CNN region descriptors, written once to a chunked cache."""

import dpnet  # noqa: F401 - its thread defaults are set before torch starts OpenMP

__version__ = "0.1.0"
