"""Training inputs: timm's augmentation and mixup, made reproducible across kills and processes.

Two properties make a resumed run reach the same weights as an uninterrupted one:

- the random augmentation of an image depends only on ``(seed, epoch, index)``
  (:class:`SeededSamples`), not on which process or worker loads it, nor on what was loaded
  before it;
- the sample order of an epoch depends only on ``(seed, epoch)`` and a resumed epoch starts at
  the first image not yet consumed (:class:`ResumableSampler`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from spatialmerge.data.images import CorruptImageError
from spatialmerge.training.config import TrainConfig


def train_transform(model: nn.Module, config: TrainConfig) -> Callable:
    """timm's training transform for ``model``: random resized crop, flip, RandAugment, random
    erasing, normalised with the model's own mean / std and interpolation. PIL -> (3, H, W)."""
    data = resolve_data_config({}, model=model)
    # A model built at another size (e.g. model.image_size=32 for a quick run) keeps its pretrained
    # config's 224: crop to the size its patch embedding expects.
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None and not getattr(model, "dynamic_img_size", False):
        data["input_size"] = (3, *tuple(size))
    transform = create_transform(
        input_size=data["input_size"],
        is_training=True,
        auto_augment=config.auto_augment,
        color_jitter=config.color_jitter,
        interpolation=data["interpolation"],
        mean=data["mean"],
        std=data["std"],
        re_prob=config.reprob,
        re_mode="pixel",
        re_count=1,
    )
    _zero_bit_posterize(transform)
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize that keeps 0 bits as a black image, as Pillow did before it started rejecting
    ``bits=0`` (Pillow 13). timm's RandAugment asks for 0 bits whenever a sampled magnitude
    reaches 10 (m9 with std 0.5: about 1 image in 700), which would end an ImageNet epoch."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _zero_bit_posterize(transform: Callable) -> None:
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize


@contextmanager
def _isolated_rng(seed: np.ndarray) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) from ``seed`` (uint32 words) inside the block and put
    the previous states back afterwards, so the caller's random streams are untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(int(seed[0]) << 32 | int(seed[1]))
        np.random.seed(seed)
        torch.manual_seed(int(seed[2]) << 32 | int(seed[3]))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``index`` of epoch ``e`` is augmented with random numbers
    seeded from ``(seed, e, index)`` alone.

    Without this, an image's augmentation depends on the random state of whichever process or
    worker loads it, which changes when a run is resumed mid-epoch or split over more processes.

    Args:
        dataset: a map-style dataset whose items are produced with python / numpy / torch
            randomness (e.g. an ImageFolder with a timm training transform).
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch's augmentations; call before building the epoch's iterator."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        words = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(4)
        with _isolated_rng(words):
            return self.dataset[index]


class UnreadableImages(Dataset):
    """Wraps a training dataset so that an unreadable image either stops the run with one line
    naming the file and both fixes, or (``skip=True``) is replaced by the next readable image.

    Items are ``(*item, skipped)`` where ``skipped`` lists the files replaced to produce this
    item, joined by newlines ("" when none): a string survives DataLoader workers and batching,
    so the training loop can count and report every skipped file.

    The replacement of item ``i`` is the first readable item of ``i + 1, i + 2, ...`` (wrapping
    around): it depends on the index alone, so a resumed run sees the same images, and every
    batch keeps its size.

    Args:
        dataset: a map-style dataset whose loading raises :class:`CorruptImageError`.
        skip: replace unreadable images instead of stopping (``trainer.skip_corrupt_images``).
    """

    def __init__(self, dataset: Dataset, skip: bool = False) -> None:
        self.dataset = dataset
        self.skip = skip

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        skipped: list[str] = []
        for offset in range(len(self)):
            try:
                item = self.dataset[(index + offset) % len(self)]
            except CorruptImageError as err:
                if not self.skip:
                    raise CorruptImageError(
                        f"{err}, or set trainer.skip_corrupt_images=true to train on without such "
                        "files (each skipped file is counted and named in results.json)",
                        err.path,
                    ) from None
                skipped.append(err.path or str(err))
                continue
            return (*item, "\n".join(skipped))
        raise CorruptImageError(
            f"none of the {len(self)} training images can be read (the first: {skipped[0]}); "
            "check dataset.root"
        )


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can begin an epoch part-way through.

    The order of an epoch is fixed by ``(seed, epoch)`` (DistributedSampler's own rule) and each
    process takes every ``num_replicas``-th index, so after ``k`` full global batches exactly the
    first ``k * global_batch`` indices of the permutation were consumed, whatever the split into
    processes. ``set_start(k * batch_size)`` on every process resumes right after them.
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, position: int) -> None:
        """Skip the first ``position`` indices of this process's share of the current epoch."""
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"start position {position} is outside this epoch's {self.num_samples} samples")
        self.start = position

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def mixup_and_criterion(config: TrainConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's batch mixup/cutmix (with label smoothing folded into its soft targets) and the loss
    that goes with it: soft-target cross-entropy, else label-smoothing or plain cross-entropy."""
    if config.uses_mixup:
        mixup = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            mode="batch",
            label_smoothing=config.smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if config.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return None, nn.CrossEntropyLoss()
