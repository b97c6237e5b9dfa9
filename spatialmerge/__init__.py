"""spatialmerge: token merging that keeps the 2D token grid of vision transformers.

    import spatialmerge
    spatialmerge.patch(model, "cubist", loc=3, r_h=8, r_w=8)
    spatialmerge.unpatch(model)
"""

from spatialmerge.adapters import MergeConfig, Stage, patch, patch_state, unpatch

__version__ = "0.1.0"

__all__ = ["MergeConfig", "Stage", "patch", "patch_state", "unpatch", "__version__"]
