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
from spatialmerge.merging.expedite import ExpediteRecord, expedite_cluster, expedite_reconstruct
from spatialmerge.merging.grid import GRID_METHODS, GridRecord, reduce_grid
from spatialmerge.merging.tome import (
    bipartite_soft_matching,
    max_r,
    merge_wavg,
    parse_r,
)

__all__ = [
    "COLLISION_RULES",
    "GRID_METHODS",
    "ExpediteRecord",
    "GridRecord",
    "bipartite_soft_matching",
    "expedite_cluster",
    "expedite_reconstruct",
    "max_r",
    "merge_wavg",
    "parse_r",
    "reduce_grid",
    "REDUCE_RULES",
    "CubistRecord",
    "cubist_merge",
    "cubist_recover",
    "merge_1d",
    "ratio_to_r",
    "window_aligned_r",
]
