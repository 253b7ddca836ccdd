"""dpnet stage 2: DP-Net (parts U, class layer V) and global baselines, streamed from the cache."""

from .estimator import DPNetClassifier

__all__ = ["DPNetClassifier"]
