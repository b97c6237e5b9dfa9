"""spatialmerge: token merging that keeps the 2D token grid of vision transformers."""

__version__ = "0.1.0"
