"""spatialmerge: token merging that keeps the 2D token grid of vision transformers.

    import spatialmerge
    spatialmerge.patch(model, "cubist", loc=3, r_h=8, r_w=8)
    spatialmerge.describe_schedule(model, "cubist", loc=3, ratio=0.125)  # what that resolves to
    spatialmerge.resolve_schedule(model, "cubist", ratio=0.125).label()  # 'cubist loc=3 ratio=0.125'
    spatialmerge.patch_state(model).last_assignment  # after a forward: which cell went where
    spatialmerge.unpatch(model)
"""

from pathlib import Path

from omegaconf import OmegaConf

from spatialmerge.adapters import (
    MergeConfig,
    Schedule,
    Stage,
    describe_schedule,
    label,
    patch,
    patch_state,
    resolve_schedule,
    unpatch,
)


def project_root() -> str:
    """The checkout this package runs from (the folder holding ``configs/``), so checkpoints,
    data and logs resolve to the same place from any working directory; the working directory
    when the package is installed without its configs."""
    root = Path(__file__).resolve().parents[1]
    return str(root) if (root / "configs").is_dir() else str(Path.cwd())


# configs/paths/default.yaml: root_dir: ${oc.env:SPATIALMERGE_ROOT,${project_root:}}
OmegaConf.register_new_resolver("project_root", project_root, replace=True)

__version__ = "0.1.0"

__all__ = [
    "MergeConfig", "Schedule", "Stage", "describe_schedule", "label", "patch", "patch_state", "project_root",
    "resolve_schedule", "unpatch", "__version__",
]
