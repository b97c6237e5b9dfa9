"""Top1Evaluator on a tiny DeiT and, for exact numbers, on a model with hand-written logits."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torchvision.datasets import ImageFolder

from spatialmerge.data import imagenet_dataset
from spatialmerge.evaluators import Top1Evaluator
from spatialmerge.pipeline import EvalContext


class TableModel(nn.Module):
    """Returns row `x[:, 0]` of a fixed logit table: the input is the sample's index."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]  # (B, classes)


def test_runs_on_a_tiny_deit(tiny_imagenet: ImageFolder, tiny_deit: nn.Module) -> None:
    evaluator = Top1Evaluator(batch_size=3, num_workers=2, progress=False, ks=(1, 2))
    result = evaluator.evaluate(tiny_deit, tiny_imagenet)
    assert result["images"] == 7
    assert set(result) == {"top1", "top2", "images"}
    # by hand: the model on every image, the label among its k best classes
    with torch.no_grad():
        logits = torch.cat([tiny_deit(image[None]) for image, _ in tiny_imagenet])  # (7, classes)
    labels = torch.tensor([label for _, label in tiny_imagenet])
    ranked = logits.argsort(1, descending=True)
    for k in (1, 2):
        hits = (ranked[:, :k] == labels[:, None]).any(1).float().mean()
        assert result[f"top{k}"] == pytest.approx(100 * float(hits), abs=1e-4)


def test_exact_top1_top5_from_known_logits() -> None:
    table = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # target 0 ranks 1st: top-1 and top-5 hit
            [0.0, 9, 1, 2, 3, 4],  # target 1 ranks 1st: top-1 and top-5 hit
            [9.0, 8, 7, 6, 5, 0],  # target 2 ranks 3rd: top-5 hit only
            [9.0, 8, 7, 6, 5, 0],  # target 5 ranks 6th: miss
        ]
    )
    dataset = [(torch.tensor([float(i)]), label) for i, label in enumerate([0, 1, 2, 5])]
    evaluator = Top1Evaluator(batch_size=3, num_workers=0, progress=False)
    assert evaluator.evaluate(TableModel(table), dataset) == {
        "top1": 50.0,
        "top5": 75.0,
        "images": 4,
    }


def test_class_count_mismatch_with_the_dataset_raises(tiny_imagenet: ImageFolder) -> None:
    model = TableModel(torch.zeros(1, 1000))
    with pytest.raises(ValueError, match="1000 classes but the dataset has 3"):
        Top1Evaluator(num_workers=0, progress=False).evaluate(model, tiny_imagenet)


def test_top5_of_three_classes_raises(tiny_imagenet: ImageFolder, tiny_deit: nn.Module) -> None:
    with pytest.raises(ValueError, match="evaluator.top1.ks"):
        Top1Evaluator(num_workers=0, progress=False).evaluate(tiny_deit, tiny_imagenet)


def test_top5_of_three_classes_is_refused_before_the_dataset_is_read(tiny_deit: nn.Module) -> None:
    class Context:
        merge = None

        def merged_model(self) -> nn.Module:
            return tiny_deit

        def dataset(self, transform: object) -> None:
            raise AssertionError("the dataset was read before the refusal")

    with pytest.raises(ValueError, match=r"ks=\[1, 5\] asks for top-5 of the model's 3 classes; use ks up to "
                                         r"3, e.g. evaluator.top1.ks=\[1,3\]"):
        Top1Evaluator(num_workers=0, progress=False).run(Context())


def test_non_tensor_output_raises() -> None:
    class TupleModel(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    dataset = [(torch.zeros(1), 0)]
    with pytest.raises(TypeError, match="tuple"):
        Top1Evaluator(num_workers=0, progress=False).evaluate(TupleModel(), dataset)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "evaluator.top1.batch_size"),
        ({"num_workers": -1}, "evaluator.top1.num_workers"),
        ({"ks": ()}, "evaluator.top1.ks"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Top1Evaluator(**kwargs)


def test_pipeline_entry_point_reads_images_with_the_models_eval_transform(
    imagenet_root: Path, tiny_deit: nn.Module
) -> None:
    # Make the tiny model's pretrained config describe its real 32 px input, so timm's
    # resolved eval transform (resize 32 / crop_pct, center crop 32) fits the model.
    tiny_deit.pretrained_cfg = {**tiny_deit.pretrained_cfg, "input_size": (3, 32, 32)}
    transforms_seen: list[Callable] = []

    def factory(transform: Callable) -> ImageFolder:
        transforms_seen.append(transform)
        return imagenet_dataset(str(imagenet_root), "val", transform=transform)

    ctx = EvalContext(tiny_deit, merge=None, device="cpu", dataset_factory=factory)
    result = Top1Evaluator(num_workers=0, progress=False, ks=(1, 2)).run(ctx)
    assert result["images"] == 7
    (transform,) = transforms_seen
    assert "CenterCrop(size=(32, 32))" in repr(transform)


def test_the_merged_top1_comes_with_the_unmerged_one_on_the_same_images(
    imagenet_root: Path, tiny_deit: nn.Module
) -> None:
    tiny_deit.pretrained_cfg = {**tiny_deit.pretrained_cfg, "input_size": (3, 32, 32)}

    def factory(transform: Callable) -> ImageFolder:
        return imagenet_dataset(str(imagenet_root), "val", transform=transform)

    merge = {"method": "cubist", "loc": 0, "r_h": 1, "r_w": 1}
    both = Top1Evaluator(num_workers=0, progress=False, ks=(1, 2)).run(
        EvalContext(tiny_deit, merge=merge, device="cpu", dataset_factory=factory)
    )
    alone = Top1Evaluator(num_workers=0, progress=False, ks=(1, 2)).run(
        EvalContext(tiny_deit, merge=None, device="cpu", dataset_factory=factory)
    )
    assert both["unmerged_top1"] == alone["top1"] and both["unmerged_top2"] == alone["top2"]
    assert both["delta_top1"] == pytest.approx(both["top1"] - alone["top1"])
    skipped = Top1Evaluator(num_workers=0, progress=False, ks=(1, 2), baseline=False).run(
        EvalContext(tiny_deit, merge=merge, device="cpu", dataset_factory=factory)
    )
    assert "unmerged_top1" not in skipped and skipped["top1"] == both["top1"]
    # what a search's --quality is checked against before its first trial
    assert set(both) - {"images", "unmerged_top1", "unmerged_top2"} == set(Top1Evaluator(ks=(1, 2)).qualities())
    assert set(skipped) - {"images"} == set(Top1Evaluator(ks=(1, 2), baseline=False).qualities())


def test_non_finite_logits_are_refused_not_counted() -> None:
    table = torch.tensor([[0.0, 1.0], [float("nan"), float("nan")], [1.0, 0.0]])
    dataset = [(torch.tensor([float(i)]), i % 2) for i in range(3)]
    with pytest.raises(ValueError, match=r"logits are not finite \(NaN or inf\) on 1 of 3 images .* check model.checkpoint"):
        Top1Evaluator(batch_size=3, num_workers=0, progress=False, ks=(1,)).evaluate(TableModel(table), dataset)
    finite = Top1Evaluator(batch_size=3, num_workers=0, progress=False, ks=(1,)).evaluate(TableModel(table.nan_to_num()), dataset)
    assert finite["images"] == 3
