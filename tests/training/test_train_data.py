"""The data pieces that make resume exact: seeded per-image augmentation, resumable sampling."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from spatialmerge.models import build_model
from spatialmerge.training import (
    ResumableSampler,
    SeededSamples,
    TrainConfig,
    train_transform,
)


class RandomItems(Dataset):
    """Item i = draws from python, numpy and torch: what an augmentation pipeline consumes."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_an_items_randomness_depends_only_on_seed_epoch_and_index():
    samples = SeededSamples(RandomItems(), seed=3)
    first = [samples[i] for i in range(10)]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert [samples[i] for i in reversed(range(10))] == first[::-1]  # order and global state: no effect
    assert len(set(first)) == 10
    samples.set_epoch(1)
    assert all(a != b for a, b in zip(first, (samples[i] for i in range(10)), strict=True))
    assert SeededSamples(RandomItems(), seed=4)[0] != first[0]


def test_loading_an_item_leaves_the_callers_random_streams_alone():
    samples = SeededSamples(RandomItems(), seed=0)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(()))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    samples[5]
    assert (random.random(), np.random.rand(), torch.rand(())) == expected


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_resumed_epoch_skips_exactly_the_consumed_global_batches(world):
    dataset, batch, done = list(range(40)), 2, 3  # 3 global batches of world x 2 consumed
    samplers = [ResumableSampler(dataset, num_replicas=world, rank=r, seed=5, drop_last=True) for r in range(world)]
    order = []
    for sampler in samplers:
        sampler.set_epoch(2)
        order.append(list(sampler))
    consumed = {i for share in order for i in share[: done * batch]}
    for sampler in samplers:
        sampler.set_start(done * batch)
    rest = [list(sampler) for sampler in samplers]
    assert [share[done * batch :] for share in order] == rest
    assert consumed.isdisjoint(i for share in rest for i in share)
    assert len(samplers[0]) == 40 // world - done * batch
    # The same images are consumed whatever the number of processes.
    one = ResumableSampler(dataset, num_replicas=1, rank=0, seed=5, drop_last=True)
    one.set_epoch(2)
    assert consumed == set(list(one)[: done * batch * world])
    samplers[0].set_epoch(3)
    assert samplers[0].start == 0


def test_randaugment_survives_zero_bit_posterize():
    model = build_model("deit_t", image_size=32, patch_size=8, depth=1, num_classes=2, embed_dim=16, num_heads=1)
    transform = train_transform(model, TrainConfig())
    (augment,) = [step for step in transform.transforms if hasattr(step, "ops")]
    (posterize,) = [op for op in augment.ops if op.name.startswith("Posterize")]
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0  # asks for 0 bits
    image = Image.new("RGB", (40, 40), (200, 90, 30))
    assert np.asarray(posterize(image)).max() == 0  # black, as Pillow < 13 made it
    assert transform(image).shape == (3, 32, 32)
