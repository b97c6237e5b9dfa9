"""Every ablation variant runs through every backbone family it applies to, and changes what it
should: reduce rules, matching metrics, collision rules, RoPE positions, window alignment."""

from functools import partial

import pytest
import timm
import torch
from segment_anything.modeling import ImageEncoderViT

import spatialmerge
from spatialmerge.merging import cubist_merge, merge_1d


def sam_encoder() -> ImageEncoderViT:
    torch.manual_seed(0)
    return ImageEncoderViT(
        img_size=128, patch_size=16, embed_dim=32, depth=3, num_heads=2, use_rel_pos=True,
        global_attn_indexes=(2,), window_size=4, out_chans=16, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()


def deit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=96, depth=3, embed_dim=32, num_heads=2).eval()


def dinov3() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_dinov3", img_size=96, depth=3, embed_dim=32, num_heads=2, init_values=1.0
    ).eval()


FAMILIES = {"sam": (sam_encoder, (1, 3, 128, 128)), "vit": (deit, (1, 3, 96, 96)), "eva": (dinov3, (1, 3, 96, 96))}


def forward(model, x):
    return model(x) if isinstance(model, ImageEncoderViT) else model.forward_features(x)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "variant",
    [
        {"reduce": "mean"},
        {"reduce": "maxnorm"},
        {"metric": "keys"},
        {"metric": "normed"},
        {"collisions": "reference"},
    ],
    ids=lambda v: "-".join(f"{k}={val}" for k, val in v.items()),
)
def test_variant_runs_and_differs_from_the_default(family, variant):
    build, shape = FAMILIES[family]
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    spatialmerge.patch(model, "cubist", loc=1, r_h=3, r_w=3)
    default = forward(model, x)
    spatialmerge.patch(model, "cubist", loc=1, r_h=3, r_w=3, **variant)
    out = forward(model, x)
    assert out.shape == default.shape and torch.isfinite(out).all()
    if variant != {"collisions": "reference"}:  # identical unless two sources collide
        assert not torch.allclose(out, default), f"{variant} changed nothing on {family}"


@torch.no_grad()
def test_reference_collisions_change_the_merge_when_sources_collide():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 8)
    exact, _ = cubist_merge(x, 3, 4)
    reference, _ = cubist_merge(x, 3, 4, collisions="reference")
    assert exact.shape == reference.shape and not torch.equal(exact, reference)
    # Within one pass the matching is the same, and exact takes the largest magnitude over a
    # superset of the values the reference keeps: never smaller, larger where sources collide.
    rows = x.reshape(12, 9, 8)
    exact_1d = merge_1d(rows, 4)[0]
    reference_1d = merge_1d(rows, 4, collisions="reference")[0]
    assert (exact_1d.abs() >= reference_1d.abs()).all()
    assert (exact_1d.abs() > reference_1d.abs()).any()


@torch.no_grad()
def test_centroid_positions_change_dinov3_and_are_refused_without_rope():
    model = dinov3()
    x = torch.randn(1, 3, 96, 96)
    spatialmerge.patch(model, "cubist", loc=1, r_h=2, r_w=2, positions="grid")
    grid = model.forward_features(x)
    spatialmerge.patch(model, "cubist", loc=1, r_h=2, r_w=2, positions="centroid")
    assert not torch.allclose(model.forward_features(x), grid)
    encoder = sam_encoder()
    spatialmerge.patch(encoder, "cubist", loc=1, r_h=2, r_w=2, positions="grid")
    with pytest.raises(ValueError, match="positions='centroid' places merged tokens for RoPE.*would change nothing"):
        spatialmerge.patch(encoder, "cubist", loc=1, r_h=2, r_w=2, positions="centroid")


@torch.no_grad()
def test_window_alignment_changes_the_reduced_grid_on_sam_only():
    encoder = sam_encoder()
    x = torch.randn(1, 3, 128, 128)
    spatialmerge.patch(encoder, "cubist", loc=1, ratio=0.4, align="window")
    encoder(x)
    assert spatialmerge.patch_state(encoder).last_hw[1] == (4, 4), "8x8 with 4x4 windows: 5 would pad to 8"
    spatialmerge.patch(encoder, "cubist", loc=1, ratio=0.4)
    encoder(x)
    assert spatialmerge.patch_state(encoder).last_hw[1] == (5, 5)
    # 8 -> 7 would pad back to 8, so alignment lands on the full grid: refused when patching,
    # not run unmerged
    with pytest.raises(ValueError, match="with align=window .* rounds to r_h=r_w=0"):
        spatialmerge.patch(encoder, "cubist", loc=1, ratio=0.15, align="window")
    with pytest.raises(ValueError, match="align='window' needs a windowed backbone"):
        spatialmerge.patch(deit(), "cubist", loc=1, ratio=0.15, align="window")


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [("reduce", "avg", "maxmag, mean, maxnorm"), ("metric", "q", "tokens, keys, normed"),
     ("positions", "mid", "grid, centroid"), ("collisions", "first", "exact, reference"), ("align", "yes", "none, window")],
)
def test_invalid_variant_values_list_the_valid_ones(key, value, valid):
    with pytest.raises(ValueError, match=f"{key}='{value}' is not supported; choose one of {valid}"):
        spatialmerge.patch(deit(), "cubist", loc=1, r_h=1, r_w=1, **{key: value})
