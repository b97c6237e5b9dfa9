"""Merging algorithms: pure tensor code that knows nothing about models."""

from spatialmerge.merging.cubist import (
    COLLISION_RULES,
    REDUCE_RULES,
    CubistRecord,
    cubist_merge,
    cubist_recover,
    merge_1d,
    ratio_to_r,
    window_aligned_r,
)

__all__ = [
    "COLLISION_RULES",
    "REDUCE_RULES",
    "CubistRecord",
    "cubist_merge",
    "cubist_recover",
    "merge_1d",
    "ratio_to_r",
    "window_aligned_r",
]
