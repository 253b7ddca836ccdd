"""dpnet stage 2: DP-Net (parts U, class layer V) and global baselines, streamed from the cache."""

import dpnet  # noqa: F401 - its thread defaults are set before torch starts OpenMP

from .estimator import DPNetClassifier

__all__ = ["DPNetClassifier"]
