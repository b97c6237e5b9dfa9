"""Tiny random-init models and synthetic datasets for the evaluator tests (CPU, milliseconds)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn
from torchvision import transforms
from torchvision.datasets import ImageFolder

from spatialmerge.data import CocoInstances, imagenet_dataset
from tests.synthetic import write_synthetic_coco, write_synthetic_imagefolder
from spatialmerge.models import build_model

TINY_SIZE = 32  # input side of the tiny DeiT


def build_tiny_sam() -> Sam:
    """A SAM with the real architecture at toy size: 128 px input, 8x8 embedding, 32 channels."""
    torch.manual_seed(0)
    dim = 32
    encoder = ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=dim,
        depth=2,
        num_heads=2,
        out_chans=dim,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=dim, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=16
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
        transformer_dim=dim,
        iou_head_hidden_dim=32,
    )
    return Sam(encoder, prompt_encoder, decoder).eval()


# Hiera at SAM 2's 1024 px with stages of 1, 1, 4, 1 blocks: stage 3 (blocks 2-5) on 64x64.
TINY_TRUNK = {
    "embed_dim": 8, "num_heads": 1, "stages": [1, 1, 4, 1], "global_att_blocks": [4],
    "window_spec": [8, 4, 14, 7], "window_pos_embed_bkg_spatial_size": [7, 7],
}


def build_tiny_sam2() -> nn.Module:
    """SAM 2.1 hiera_t's neck and decoder on the reduced trunk above, weights wide enough
    (std 0.2) that merging changes the embedding."""
    torch.manual_seed(0)
    model = build_model("sam2_t", trunk=TINY_TRUNK)
    for parameter in model.image_encoder.trunk.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return model


def build_tiny_deit(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        img_size=TINY_SIZE,
        patch_size=8,
        depth=1,
        num_classes=num_classes,
    ).eval()


def miou_by_hand(predictor: Any, dataset: CocoInstances, prompt: str) -> tuple[float, float]:
    """(mIoU over instances, mean of per-image mIoU) in %: a SamPredictor or SAM2ImagePredictor
    called once per prompt (``predict``, one mask), each mask against its instance's mask."""
    per_image = []
    for item in dataset:
        predictor.set_image(item["image"])
        ious = []
        for prompt_xy, truth in zip(item["prompts"], item["masks"]):
            where = {"box": prompt_xy} if prompt == "box" else {
                "point_coords": prompt_xy[None], "point_labels": np.ones(1)}
            mask = torch.from_numpy(np.asarray(predictor.predict(multimask_output=False, **where)[0][0]) > 0.5)
            truth = torch.as_tensor(truth).bool()
            ious.append(float((mask & truth).sum()) / max(float((mask | truth).sum()), 1.0))
        per_image.append(ious)
    every = [iou for ious in per_image for iou in ious]
    return 100 * float(np.mean(every)), 100 * float(np.mean([np.mean(ious) for ious in per_image]))


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_synthetic_coco(str(tmp_path_factory.mktemp("coco"))))


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes holding 3, 2 and 2 images: 7 images, so two ranks get unequal shards."""
    return Path(write_synthetic_imagefolder(str(tmp_path_factory.mktemp("imagenet"))))


@pytest.fixture(scope="session")
def tiny_imagenet(imagenet_root: Path) -> ImageFolder:
    """The synthetic ImageNet val split at the tiny DeiT's input size (timm's resolved config
    would say 224 px)."""
    transform = transforms.Compose(
        [transforms.Resize(TINY_SIZE), transforms.CenterCrop(TINY_SIZE), transforms.ToTensor()]
    )
    return imagenet_dataset(str(imagenet_root), "val", transform=transform)


@pytest.fixture
def tiny_sam() -> Sam:
    return build_tiny_sam()


@pytest.fixture
def tiny_deit() -> nn.Module:
    return build_tiny_deit()
