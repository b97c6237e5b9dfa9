"""Evaluation metrics as pure tensor code, with accumulators whose sums reduce across processes.

Each accumulator keeps only sums. `state()` returns them as one tensor and `merge(state)` adds a
state in, so a distributed evaluation is: accumulate locally, all-reduce `state()`, `merge` the
total into a fresh accumulator, `compute()`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def check_finite(values: Tensor, what: str, items: str, metric: str) -> None:
    """Refuse ``values`` (N, ...) where any of its N ``items`` holds a NaN or inf.

    An argmax, a threshold or a cosine of NaN is still a number (a class, an empty mask, 0), so
    broken weights would give a silent top-1, mIoU or fidelity instead of an error.
    """
    finite = torch.isfinite(values.detach()).flatten(1).all(1)  # (N,)
    if not finite.all():
        raise ValueError(
            f"{what} are not finite (NaN or inf) on {int((~finite).sum())} of {values.shape[0]} "
            f"{items}: the model's weights are broken (a corrupt or diverged checkpoint, or a merge "
            f"that overflowed), so {metric} would mean nothing; check model.checkpoint"
        )


def mask_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """Intersection over union of each predicted mask with its ground truth.

    pred, gt: (K, H, W) bool. Returns (K,) float32 in [0, 1]. Two empty masks agree perfectly, so
    an empty union gives 1.0 (not 0/0).
    """
    if pred.shape != gt.shape or pred.dim() != 3:
        raise ValueError(
            f"pred and gt must both be (K, H, W), got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    pred, gt = pred.bool(), gt.bool()
    inter = (pred & gt).flatten(1).sum(1)  # (K,)
    union = (pred | gt).flatten(1).sum(1)  # (K,)
    iou = inter.float() / union.clamp(min=1).float()
    return torch.where(union == 0, torch.ones_like(iou), iou)


class SumsAccumulator:
    """An accumulator whose whole state is one tensor of sums and counts (``_sums``), so the
    processes of a distributed run combine theirs with one all-reduce: ``state()`` there,
    ``merge()`` here. Subclasses keep the tensor in a dtype that makes the counts exact."""

    _sums: Tensor

    def state(self) -> Tensor:
        """The sums, (S,), to all-reduce and `merge` elsewhere."""
        return self._sums.clone()

    def merge(self, state: Tensor) -> None:
        """Add another accumulator's `state()` (or a reduction of several) into this one."""
        if state.shape != self._sums.shape:
            raise ValueError(
                f"state must have shape ({len(self._sums)},){self._state_names()}, got "
                f"{tuple(state.shape)}"
            )
        self._sums += state.detach().to("cpu", self._sums.dtype)

    def _state_names(self) -> str:
        """What the sums are, for the shape mismatch's message."""
        return ""


class MeanIoU(SumsAccumulator):
    """Mean IoU over instances, and over images (each image's own mean IoU, then averaged).

    The two differ when images hold different numbers of instances: the per-instance mean weighs
    crowded images more.
    """

    def __init__(self) -> None:
        # [sum of instance IoUs, instances, sum of per-image mean IoUs, images]; float64 keeps
        # the counts exact and the sums stable over COCO's ~36k instances.
        self._sums = torch.zeros(4, dtype=torch.float64)

    def update(self, ious: Tensor) -> None:
        """Add one image's instance IoUs, (K,) with K >= 1."""
        if ious.dim() != 1 or ious.numel() == 0:
            raise ValueError(
                f"ious must be one image's (K,) IoUs with K >= 1, got shape {tuple(ious.shape)}"
            )
        ious = ious.detach().to("cpu", torch.float64)
        self._sums += torch.stack(
            [ious.sum(), ious.new_tensor(ious.numel()), ious.mean(), ious.new_tensor(1.0)]
        )

    def compute(self) -> dict[str, float | int]:
        """{"miou": per-instance mean (%), "miou_per_image": per-image mean (%), "instances",
        "images"}."""
        iou_sum, instances, image_mean_sum, images = self._sums.tolist()
        if instances == 0:
            raise ValueError("MeanIoU has no instances: call update() before compute()")
        return {
            "miou": 100.0 * iou_sum / instances,
            "miou_per_image": 100.0 * image_mean_sum / images,
            "instances": int(instances),
            "images": int(images),
        }


# The fidelity numbers reported in percent (the others are cosines or divergences).
FIDELITY_PERCENT: tuple[str, ...] = ("mask_iou", "top1_agreement", "top5_overlap", "segment_agreement")
# Every metric reported in percent (the evaluators' own and fidelity's), also as unmerged_<key>
# and delta_<key> (a difference in points).
PERCENT_METRICS = re.compile(
    rf"(unmerged_|delta_)?(miou|miou_per_image|top\d+|{'|'.join(FIDELITY_PERCENT)})"
)


def is_percent(key: str) -> bool:
    """Whether the metric ``key`` is a percentage (``top1``, ``delta_miou``, ...)."""
    return PERCENT_METRICS.fullmatch(key) is not None


def topk_correct(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many samples have their target among the k highest logits, for each k in `ks`.

    logits: (N, classes); target: (N,) class indices. Ties between logits are broken by
    `torch.topk`. k larger than the number of classes raises: top-5 of a 3-class problem would
    be 100% by construction and say nothing.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (N, classes) and target (N,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    if not ks or min(ks) < 1 or max(ks) > num_classes:
        raise ValueError(
            f"ks={tuple(ks)} must be non-empty with every k in [1, {num_classes}] (the number of "
            f"classes); e.g. evaluator.top1.ks=[1,{min(5, num_classes)}]"
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target holds class indices in [{int(target.min())}, {int(target.max())}] but the "
            f"logits have {num_classes} classes: the model and the dataset disagree on classes"
        )
    top = logits.topk(max(ks), dim=1).indices  # (N, max k), best first
    hit = top == target.to(top.device)[:, None]  # (N, max k); at most one True per row
    return {k: int(hit[:, :k].sum()) for k in ks}


class Accuracy(SumsAccumulator):
    """Top-k accuracy over all samples seen, in percent."""

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"ks={tuple(ks)} must be non-empty positive ints; e.g. ks=[1,5]")
        self.ks = tuple(ks)
        # [correct@k for k in ks..., samples]
        self._sums = torch.zeros(len(self.ks) + 1, dtype=torch.int64)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: logits (N, classes), target (N,)."""
        correct = topk_correct(logits, target, self.ks)
        self._sums += torch.tensor([correct[k] for k in self.ks] + [target.numel()])

    def compute(self) -> dict[str, float | int]:
        """{"top1": %, "top5": % (one key per k), "images": samples seen}."""
        *correct, count = self._sums.tolist()
        if count == 0:
            raise ValueError("Accuracy has no samples: call update() before compute()")
        result: dict[str, float | int] = {
            f"top{k}": 100.0 * c / count for k, c in zip(self.ks, correct)
        }
        result["images"] = count
        return result


class Means(SumsAccumulator):
    """Per-item means of named metrics, each a sum over items and one shared item count.

    The names are those given and, in order, any new name an update brings; an accumulator that
    merges another's ``state()`` must know the same names (``Means(other.names, ...)``).

    Args:
        names: metrics known before the first update.
        percent: metrics reported in percent (x 100).
    """

    def __init__(self, names: Sequence[str] = (), percent: Sequence[str] = ()) -> None:
        self.names: list[str] = []
        self.percent = frozenset(percent)
        # [sum of each named metric..., items]; float64 keeps the count exact and the sums stable
        self._sums = torch.zeros(1, dtype=torch.float64)
        self._add_names(names)

    def _add_names(self, names: Sequence[str]) -> None:
        new = [name for name in names if name not in self.names]
        if new:
            self.names.extend(new)
            zeros = self._sums.new_zeros(len(new))
            self._sums = torch.cat([self._sums[:-1], zeros, self._sums[-1:]])

    def update(self, sums: Mapping[str, Tensor | float], count: int) -> None:
        """Add ``count`` items; each value is the sum of that metric over those items."""
        self._add_names(list(sums))
        for name, value in sums.items():
            self._sums[self.names.index(name)] += float(value)
        self._sums[-1] += count

    def _state_names(self) -> str:
        return f" for the metrics {self.names}"

    def compute(self) -> dict[str, float]:
        """{name: per-item mean (x 100 for ``percent`` names)}, in the order of ``names``."""
        *sums, count = self._sums.tolist()
        if count == 0:
            raise ValueError("Means has no items: call update() before compute()")
        return {
            name: (100.0 if name in self.percent else 1.0) * value / count
            for name, value in zip(self.names, sums)
        }


def kmeans(features: Tensor, k: int, iters: int = 20) -> tuple[Tensor, Tensor]:
    """Spherical k-means of one image's features, deterministic (no random draw).

    Features are L2-normalised, so clusters group directions, as cosine similarity does.
    Centroids start by farthest-point seeding from the feature nearest the mean direction, then
    Lloyd iterations; a centroid that loses every member keeps its previous position.

    Args:
        features: (N, C) float.
        k: clusters, 1 <= k <= N.
        iters: Lloyd iterations.

    Returns:
        labels (N,) int64 in [0, k) and centroids (k, C), unit norm.
    """
    n = features.shape[0]
    if features.dim() != 2 or not 1 <= k <= n:
        raise ValueError(f"kmeans needs (N, C) features with 1 <= k <= N, got {tuple(features.shape)}, k={k}")
    x = torch.nn.functional.normalize(features.float(), dim=1)  # (N, C)
    first = int((x @ torch.nn.functional.normalize(x.mean(0), dim=0)).argmax())
    chosen = [first]
    closest = x @ x[first]  # (N,) similarity to the nearest chosen seed
    for _ in range(1, k):
        nxt = int(closest.argmin())
        chosen.append(nxt)
        closest = torch.maximum(closest, x @ x[nxt])
    centroids = x[chosen].clone()  # (k, C)
    for _ in range(iters):
        labels = (x @ centroids.T).argmax(1)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        moved = torch.nn.functional.normalize(sums, dim=1)
        centroids = torch.where((counts > 0)[:, None], moved, centroids)
    return (x @ centroids.T).argmax(1), centroids


def segment_agreement(unmerged: Tensor, merged: Tensor, k: int = 6) -> Tensor:
    """Share of patches that land in the same k-means segment with and without merging.

    The segments are fitted on each image's unmerged features; the merged features are assigned
    to those same centroids, so the score asks whether merging moved a patch across a segment
    boundary (1.0: the segmentation is unchanged).

    Args:
        unmerged, merged: (B, C, H, W) dense features of one shape.
        k: segments per image.

    Returns:
        (B,) float32 in [0, 1].
    """
    if unmerged.shape != merged.shape or unmerged.dim() != 4:
        raise ValueError(
            f"unmerged and merged must be (B, C, H, W) of one shape, got {tuple(unmerged.shape)} "
            f"and {tuple(merged.shape)}"
        )
    scores = []
    for ref, new in zip(unmerged.flatten(2).transpose(1, 2), merged.flatten(2).transpose(1, 2)):
        labels, centroids = kmeans(ref, min(k, ref.shape[0]))  # ref (H*W, C)
        moved = (torch.nn.functional.normalize(new.float(), dim=1) @ centroids.T).argmax(1)
        scores.append((moved == labels).float().mean())
    return torch.stack(scores)


def beside_baseline(
    merged: Mapping[str, Any], unmerged: Mapping[str, Any], keys: Sequence[str]
) -> dict[str, Any]:
    """The merged model's metrics with, for each of ``keys``, the unmerged model's value on the
    same images (``unmerged_<key>``) and the difference merged - unmerged (``delta_<key>``)."""
    out = dict(merged)
    for key in keys:
        out[f"unmerged_{key}"] = unmerged[key]
        out[f"delta_{key}"] = merged[key] - unmerged[key]
    return out
