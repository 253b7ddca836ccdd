"""dpnet stage 1: frozen-CNN region descriptors, written once to a chunked cache."""

import dpnet  # noqa: F401 - its thread defaults are set before torch starts OpenMP

from dpnet import __version__  # noqa: E402,F401 - one version for the package and its caches
