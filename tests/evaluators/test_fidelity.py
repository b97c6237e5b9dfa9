"""FidelityEvaluator on tiny random-init SAM, DeiT and DINOv3 models, and its metrics by hand."""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import build_point_grid
from skimage import data
from skimage.transform import resize
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms

import spatialmerge
from spatialmerge.data import ImageFolderUnlabeled
from spatialmerge.evaluators.metrics import mask_iou, segment_agreement
from spatialmerge.evaluators.fidelity import (
    FidelityEvaluator,
    fidelity_map,
    logit_fidelity,
    model_kind,
    topk_overlap,
)
from spatialmerge.pipeline import EvalContext

SIDE = 64  # input side of the tiny DeiT / DINOv3
ZERO_MERGE = dict(method="cubist", loc=1, r_h=0, r_w=0)  # a merge stage that removes nothing
REAL_MERGE = dict(method="cubist", loc=1, ratio=0.25)


def build_deit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=SIDE, depth=2, num_classes=10).eval()


def build_dinov3() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_dinov3", img_size=SIDE, depth=2, embed_dim=64, num_heads=2
    ).eval()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three natural photos, downsized to 72x96 (not square, so SAM resizes and pads)."""
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        image = resize(getattr(data, name)(), (72, 96), anti_aliasing=True)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / f"{name}.png")
    return root


def tensors(root: Path) -> ImageFolderUnlabeled:
    transform = transforms.Compose(
        [transforms.Resize(SIDE), transforms.CenterCrop(SIDE), transforms.ToTensor()]
    )
    return ImageFolderUnlabeled(str(root), transform=transform)


@pytest.fixture(params=["sam", "classifier", "features"])
def setup(request: pytest.FixtureRequest, image_root: Path) -> tuple[nn.Module, Dataset, str]:
    """A tiny model of each kind with the images it takes."""
    if request.param == "sam":
        return request.getfixturevalue("tiny_sam"), ImageFolderUnlabeled(str(image_root)), "sam"
    build = build_deit if request.param == "classifier" else build_dinov3
    return build(), tensors(image_root), request.param


PERFECT: dict[str, dict[str, float]] = {
    "sam": {"mask_iou": 100.0, "embedding_cosine": 1.0},
    "classifier": {"top1_agreement": 100.0, "kl": 0.0, "top5_overlap": 100.0},
    "features": {"feature_cosine": 1.0, "segment_agreement": 100.0, "pooled_cosine": 1.0},
}


def test_nothing_merged_through_a_patched_copy_is_perfect(setup: tuple[nn.Module, Dataset, str]) -> None:
    """A deep copy patched to remove nothing runs as a second model beside the first."""
    model, dataset, kind = setup
    result = FidelityEvaluator(num_workers=0, progress=False).evaluate(model, ZERO_MERGE, dataset)
    assert result["kind"] == kind and result["images"] == 3
    metrics = {k: v for k, v in result.items() if k not in ("kind", "images")}
    assert metrics == pytest.approx(PERFECT[kind], abs=1e-5)


def test_without_a_merge_the_model_is_compared_with_itself_and_says_so(
    setup: tuple[nn.Module, Dataset, str], caplog: pytest.LogCaptureFixture
) -> None:
    model, dataset, kind = setup
    with caplog.at_level("INFO", logger="spatialmerge.evaluators.fidelity"):
        result = FidelityEvaluator(max_images=1, num_workers=0, progress=False).evaluate(model, None, dataset)
    assert "compared with itself" in caplog.text
    metrics = {k: v for k, v in result.items() if k not in ("kind", "images")}
    assert metrics == pytest.approx(PERFECT[kind], abs=1e-5)


def by_hand(model: nn.Module, dataset: Dataset, kind: str, count: int) -> dict[str, float]:
    """The fidelity metrics of REAL_MERGE written out on ``count`` images: a separately patched
    copy, both models run image by image, each metric from its definition."""
    merged = spatialmerge.patch(copy.deepcopy(model), **REAL_MERGE, **({"recover": True} if kind == "features" else {}))
    items = [dataset[i] for i in range(count)]
    with torch.no_grad():
        if kind == "sam":
            ious, cosines = [], []
            for image in items:
                image = np.asarray(image)
                height, width = image.shape[:2]
                points = build_point_grid(4) * np.array([[width, height]])  # the default 4 x 4 clicks
                outputs = []
                for sam in (model, merged):
                    predictor = SamPredictor(sam)
                    predictor.set_image(image)
                    masks = [predictor.predict(point_coords=p[None], point_labels=np.ones(1),
                                               multimask_output=False)[0][0] for p in points]
                    outputs.append((predictor.get_image_embedding(), torch.from_numpy(np.stack(masks))))
                (embedding, masks), (merged_embedding, merged_masks) = outputs
                ious.append(mask_iou(merged_masks, masks).mean())
                cosines.append(F.cosine_similarity(embedding, merged_embedding, dim=1).mean())
            return {"mask_iou": 100 * float(torch.stack(ious).mean()),
                    "embedding_cosine": float(torch.stack(cosines).mean())}
        images = torch.stack(items)
        if kind == "classifier":
            p, q = model(images).softmax(1), merged(images).softmax(1)
            top5 = [len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist())) / 5 for a, b in zip(p, q)]
            return {"top1_agreement": 100 * float((p.argmax(1) == q.argmax(1)).float().mean()),
                    "kl": float((p * (p.log() - q.log())).sum(1).mean()),
                    "top5_overlap": 100 * sum(top5) / count}
        side = SIDE // 16
        tokens, merged_tokens = model.forward_features(images), merged.forward_features(images)
        prefix = model.num_prefix_tokens
        grid = tokens[:, prefix:].unflatten(1, (side, side)).permute(0, 3, 1, 2)
        merged_grid = merged_tokens[:, prefix:].unflatten(1, (side, side)).permute(0, 3, 1, 2)
        pooled = model.forward_head(tokens, pre_logits=True)
        merged_pooled = merged.forward_head(merged_tokens, pre_logits=True)
        return {"feature_cosine": float(F.cosine_similarity(grid, merged_grid, dim=1).mean()),
                "pooled_cosine": float(F.cosine_similarity(pooled, merged_pooled, dim=1).mean()),
                "segment_agreement": 100 * float(segment_agreement(grid, merged_grid, 6).mean())}


def test_a_real_merge_scores_what_a_hand_comparison_of_the_two_models_gives(
    setup: tuple[nn.Module, Dataset, str]
) -> None:
    model, dataset, kind = setup
    evaluator = FidelityEvaluator(max_images=2, batch_size=2, num_workers=0, progress=False)
    result = evaluator.evaluate(model, REAL_MERGE, dataset)
    assert result["kind"] == kind and result["images"] == 2
    # what a search's --quality is checked against: every number but the count and the KL divergence
    assert set(result) - {"kind", "images", "kl"} <= set(evaluator.qualities()), "a real quality would be refused"
    expected = by_hand(model, dataset, kind, 2)
    # rel 1e-4: a batched mask decoder can flip a pixel at the threshold that a one-prompt call does not
    assert {k: v for k, v in result.items() if k not in ("kind", "images")} == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert all(v != pytest.approx(PERFECT[kind][k], abs=1e-4) for k, v in expected.items()
               if k not in ("top1_agreement", "top5_overlap", "segment_agreement", "mask_iou")), \
        "the merge must move the continuous metrics off perfect for this check to bite"
    # The merge went on a copy: the caller's model stays unmerged.
    assert spatialmerge.patch_state(model) is None


def test_samvit_neck_features_are_compared_per_position(image_root: Path) -> None:
    torch.manual_seed(0)
    samvit = timm.create_model(
        "samvit_base_patch16", img_size=SIDE, depth=2, embed_dim=32, num_heads=2,
        global_attn_indexes=(1,), window_size=2, neck_chans=16,
    ).eval()
    evaluator = FidelityEvaluator(batch_size=3, num_workers=0, progress=False)
    same = evaluator.evaluate(samvit, ZERO_MERGE, tensors(image_root))
    merged = evaluator.evaluate(samvit, REAL_MERGE, tensors(image_root))
    assert set(merged) - {"kind", "images"} <= set(evaluator.qualities())
    assert same["feature_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["pooled_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert merged["feature_cosine"] < 0.9999


@pytest.mark.parametrize("kind", ["sam", "features"])
def test_run_gives_each_family_its_input(image_root: Path, tiny_sam: Sam, kind: str) -> None:
    model = tiny_sam if kind == "sam" else build_dinov3()
    ctx = EvalContext(
        model, REAL_MERGE, "cpu", partial(ImageFolderUnlabeled, str(image_root))
    )
    result = FidelityEvaluator(max_images=2, num_workers=2, progress=False).run(ctx)
    assert result["kind"] == kind and result["images"] == 2
    item = ctx.dataset()[0]
    if kind == "sam":
        assert isinstance(item, np.ndarray) and item.shape == (72, 96, 3)
    else:
        # timm's eval transform for DINOv3: 256 px crop, normalised.
        assert isinstance(item, Tensor) and item.shape == (3, 256, 256)


def test_fidelity_map_by_hand() -> None:
    unmerged = torch.zeros(1, 2, 1, 3)  # (B, C, H, W): three positions with 2 channels
    unmerged[0, :, 0] = torch.tensor([[1.0, 1.0, 3.0], [0.0, 0.0, 4.0]])
    merged = torch.zeros(1, 2, 1, 3)
    merged[0, :, 0] = torch.tensor([[1.0, 0.0, -6.0], [1.0, 2.0, -8.0]])
    expected = torch.tensor([[[1 / math.sqrt(2), 0.0, -1.0]]])  # 45 degrees, orthogonal, opposite
    assert torch.allclose(fidelity_map(unmerged, merged), expected, atol=1e-6)
    channels_last = fidelity_map(unmerged.permute(0, 2, 3, 1), merged.permute(0, 2, 3, 1), "NHWC")
    assert torch.allclose(channels_last, expected, atol=1e-6)

    features = torch.randn(2, 8, 4, 5)
    assert fidelity_map(features, features).shape == (2, 4, 5)
    assert torch.allclose(fidelity_map(features, 3 * features), torch.ones(2, 4, 5))
    assert torch.allclose(fidelity_map(features, -features), -torch.ones(2, 4, 5))


def test_logit_metrics_by_hand() -> None:
    unmerged = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    merged = torch.tensor([[0.3, 0.4, 0.1, 0.2], [0.4, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4]])
    # Logits are log-probabilities plus any per-row constant: softmax gives the rows back.
    result = logit_fidelity(unmerged.log() + 5.0, merged.log() - 2.0)
    assert result["top1_agreement"].tolist() == [0.0, 1.0, 1.0]
    # KL(p || q) = sum p log(p / q), e.g. row 0: .4 log(4/3) + .3 log(3/4) + .2 log 2 + .1 log(1/2).
    expected_kl = [0.1 * math.log(8 / 3), 0.2 * math.log(3), 0.0]
    assert result["kl"].tolist() == pytest.approx(expected_kl, abs=1e-6)
    # Top-2 sets: {0, 1} vs {0, 1}; {0, 1} vs {0, 3}; {3, 2} vs {3, 2}.
    assert topk_overlap(unmerged, merged, k=2).tolist() == [1.0, 0.5, 1.0]


class _Empty(Dataset):
    root = "/data/holiday-photos"

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: FidelityEvaluator(max_images=0), ValueError, "max_images=0 must be >= 1"),
        (lambda: FidelityEvaluator(points_per_side=0), ValueError, "points_per_side=0"),
        (lambda: FidelityEvaluator(batch_size=0), ValueError, "batch_size=0"),
        (lambda: FidelityEvaluator(num_workers=-1), ValueError, "num_workers=-1"),
        (lambda: model_kind(nn.Linear(2, 2)), TypeError, "torch.nn.modules.linear.Linear"),
        (
            lambda: FidelityEvaluator().evaluate(build_deit(), None, _Empty()),
            ValueError,
            "/data/holiday-photos holds no images",
        ),
        (lambda: fidelity_map(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 4)), ValueError, "one shape"),
        (lambda: topk_overlap(torch.ones(2, 5), torch.ones(2, 5), k=5), ValueError, r"k=5 must be in \[1, 4\]"),
    ],
)
def test_clear_errors(make: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_sam_encoder_alone_is_rejected_with_a_hint(tiny_sam: Sam) -> None:
    with pytest.raises(TypeError, match="ImageEncoderViT.*pass the whole Sam"):
        FidelityEvaluator().evaluate(tiny_sam.image_encoder, None, _Empty())


def test_non_finite_outputs_are_refused_not_compared(setup: tuple[nn.Module, Dataset, str]) -> None:
    """The cosine or KL of NaN outputs would be a number (a silent 0 or NaN fidelity)."""
    model, dataset, kind = setup
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    what = {"sam": "the image embedding's values", "classifier": "the unmerged model's logits",
            "features": "the unmerged model's features"}[kind]
    with pytest.raises(ValueError, match=rf"{what} are not finite \(NaN or inf\) on \d+ of \d+ .*so fidelity would mean nothing"):
        FidelityEvaluator(num_workers=0, progress=False).evaluate(model, REAL_MERGE, dataset)
