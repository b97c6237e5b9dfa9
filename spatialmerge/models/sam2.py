"""SAM 2 / 2.1 models (Hiera-T / S / B+ / L image encoders), built from sam2's own configs.

sam2's ``build_sam2`` composes its model config with Hydra's global ``compose``, which needs
sam2's config module to be the initialised Hydra search path. Inside this project's Hydra run
(``eval.py``, ``train.py``) the global Hydra belongs to this project, so ``compose`` would look in
the wrong place. The package's YAML is therefore read directly (``OmegaConf.load`` of the file
inside the installed ``sam2`` package), with the same post-processing overrides ``build_sam2``
applies, and built with ``hydra.utils.instantiate``, which needs no global Hydra state. Weights
go through the safe loader (sam2 reads ``ckpt["model"]``, the loader unwraps it too).
"""

from __future__ import annotations

import importlib.resources
import sys
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from spatialmerge.models.checkpoints import PathLike, load_checkpoint

# Registry name -> sam2 package config.
SAM2_CONFIGS: dict[str, str] = {
    "sam2_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
# What build_sam2(apply_postprocessing=True) sets for image prediction: fall back to the
# multi-mask output when the single mask is unstable.
_POSTPROCESSING: dict[str, Any] = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}


def _import_sam2(name: str) -> None:
    """Import sam2 and leave Hydra's global state as it was. sam2's ``__init__`` initialises
    the global Hydra with its own config module when nothing has; this builder does not need
    that, and left behind it would make a later ``hydra.initialize`` (or a Hydra app) fail. To
    call sam2's own ``build_sam2`` afterwards, initialise it as sam2 does:
    ``hydra.initialize_config_module("sam2", version_base="1.2")``."""
    if "sam2" in sys.modules:
        return
    was_initialized = GlobalHydra.instance().is_initialized()
    try:
        import sam2  # noqa: F401
    except ImportError:
        raise ImportError(
            f"model {name!r} needs the sam2 package: SAM2_BUILD_CUDA=0 pip install "
            "--no-build-isolation sam2==1.1.0"
        ) from None
    if not was_initialized:
        GlobalHydra.instance().clear()


def build_sam2_model(
    name: str, checkpoint: PathLike | None = None, trunk: dict[str, Any] | None = None
) -> nn.Module:
    """A ``sam2.modeling.sam2_base.SAM2Base`` as ``sam2.build_sam.build_sam2`` makes it, in eval
    mode on the CPU.

    Args:
        name: one of ``SAM2_CONFIGS`` (SAM 2.1 configs).
        checkpoint: the official ``sam2.1_hiera_*.pt`` (or a state dict of the same keys); None
            keeps random weights.
        trunk: overrides for the Hiera trunk (``embed_dim``, ``num_heads``, ``stages``,
            ``global_att_blocks``, ``window_spec``, ``window_pos_embed_bkg_spatial_size``), e.g. a
            tiny encoder for tests; the neck's channel list follows the trunk's widths.
    """
    _import_sam2(name)
    config = OmegaConf.load(str(importlib.resources.files("sam2") / SAM2_CONFIGS[name]))
    model_cfg = config.model
    if trunk:
        unknown = sorted(set(trunk) - {
            "embed_dim", "num_heads", "stages", "global_att_blocks", "window_spec",
            "window_pos_embed_bkg_spatial_size", "q_pool", "dim_mul", "head_mul",
        })
        if unknown:
            raise ValueError(f"model.trunk keys {unknown} are not Hiera size options for {name!r}")
        model_cfg.image_encoder.trunk.update(trunk)
        width = model_cfg.image_encoder.trunk.embed_dim
        stages = len(model_cfg.image_encoder.trunk.get("stages", (2, 3, 16, 3)))
        mul = model_cfg.image_encoder.trunk.get("dim_mul", 2.0)
        model_cfg.image_encoder.neck.backbone_channel_list = [
            int(width * mul**i) for i in reversed(range(stages))
        ]
    extra = model_cfg.get("sam_mask_decoder_extra_args")
    model_cfg.sam_mask_decoder_extra_args = {
        **(OmegaConf.to_container(extra) if extra is not None else {}), **_POSTPROCESSING
    }
    OmegaConf.resolve(config)
    model = instantiate(model_cfg, _recursive_=True)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_name=name)
    return model.eval()
