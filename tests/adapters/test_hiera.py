"""SAM 2's Hiera encoder patched with every grid method: exact where it must be, recovered to
each stage's native size for the neck, and SAM2ImagePredictor working unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import spatialmerge
from spatialmerge.merging import cubist_merge, cubist_recover
from spatialmerge.models import CheckpointNotFoundError, build_model

# A reduced Hiera-B+ at SAM 2's 1024 px (SAM2ImagePredictor assumes the 256/128/64 feature
# sizes of a 1024 input): stages of 1, 1, 4, 1 blocks, stage ends [0, 1, 5, 6], q-pool blocks
# [1, 2, 6], stage 3 = blocks 2-5 on a 64x64 grid with 14-windows and block 4 global.
TINY_TRUNK = {
    "embed_dim": 8, "num_heads": 1, "stages": [1, 1, 4, 1], "global_att_blocks": [4],
    "window_spec": [8, 4, 14, 7], "window_pos_embed_bkg_spatial_size": [7, 7],
}
STAGE3 = 3  # the default loc: the first stage-3 block after its q-pool block


@pytest.fixture(scope="module")
def sam2():
    torch.manual_seed(0)
    model = build_model("sam2_b+", trunk=TINY_TRUNK)
    for parameter in model.image_encoder.trunk.parameters():  # pos embeds start at zero
        torch.nn.init.normal_(parameter, std=0.2)
    return model


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))


def features(model, x) -> list[torch.Tensor]:
    return model.image_encoder(x)["backbone_fpn"]


def reference_trunk(trunk, x, loc, r_h, r_w) -> list[torch.Tensor]:
    """Hiera by hand: embed + positions, blocks, cubist_merge before ``loc``, cubist_recover at
    the end of its stage, every stage end's output kept."""
    t = trunk.patch_embed(x)
    t = t + trunk._get_pos_embed(t.shape[1:3])
    outputs, record = [], None
    for i, block in enumerate(trunk.blocks):
        if i == loc:
            t, record = cubist_merge(t, r_h, r_w)
        t = block(t)
        if i in trunk.stage_ends:
            if record is not None:
                t, record = cubist_recover(t, record), None
            outputs.append(t.permute(0, 3, 1, 2))
    return outputs


@torch.no_grad()
def test_zero_reduction_equals_unpatched_and_unpatch_is_exact(sam2, image):
    expected = features(sam2, image)
    spatialmerge.patch(sam2, "cubist", loc=STAGE3, r_h=0, r_w=0)
    assert type(sam2.image_encoder.trunk).__name__ == "MergingHiera"
    for got, want in zip(features(sam2, image), expected, strict=True):
        assert torch.equal(got, want)
    spatialmerge.patch(sam2, "cubist", loc=STAGE3, ratio=0.125, align="window")
    assert not torch.allclose(features(sam2, image)[-1], expected[-1], atol=1e-4)
    spatialmerge.unpatch(sam2)
    assert type(sam2.image_encoder.trunk).__name__ == "Hiera"
    for got, want in zip(features(sam2, image), expected, strict=True):
        assert torch.equal(got, want)


@torch.no_grad()
@pytest.mark.parametrize(("loc", "r_h", "r_w"), [(3, 8, 8), (4, 5, 9), (0, 30, 20)])
def test_cubist_equals_a_hand_written_trunk_forward(sam2, image, loc, r_h, r_w):
    # (3, 8, 8): 64 -> 56, whole 14-windows; (4, 5, 9): a global block on a non-square grid;
    # (0, 30, 20): stage 1 (256x256, 8-windows), recovered before the first q-pool.
    trunk = sam2.image_encoder.trunk
    expected = reference_trunk(trunk, image, loc, r_h, r_w)
    spatialmerge.patch(trunk, "cubist", loc=loc, r_h=r_h, r_w=r_w)
    try:
        got = trunk(image)
        state = spatialmerge.patch_state(trunk)
    finally:
        spatialmerge.unpatch(trunk)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    side = 256 if loc == 0 else 64
    assert state.last_hw == ((side, side), (side - r_h, side - r_w))


@torch.no_grad()
@pytest.mark.parametrize("method", ["cubist", "tome", "expedite", "oracle", "pool"])
def test_every_grid_method_runs_and_every_stage_output_keeps_its_native_size(sam2, image, method):
    expected = features(sam2, image)
    spatialmerge.patch(sam2, method, ratio=0.125, align="window")
    try:
        got = features(sam2, image)
        state = spatialmerge.patch_state(sam2)
    finally:
        spatialmerge.unpatch(sam2)
    assert [f.shape for f in got] == [f.shape for f in expected]
    assert state.last_hw == ((64, 64), (56, 56)), "merged in stage 3, 64x64 -> four 14-windows"
    assert all(torch.isfinite(f).all() for f in got)
    assert not torch.allclose(got[-1], expected[-1], atol=1e-5), "the merge changed the features"


@torch.no_grad()
def test_a_batch_is_merged_image_by_image(sam2, image):
    spatialmerge.patch(sam2, "cubist", ratio=0.125, align="window")
    try:
        both = features(sam2, image)
        singles = [features(sam2, image[i : i + 1]) for i in range(2)]
    finally:
        spatialmerge.unpatch(sam2)
    for level, stacked in enumerate(both):
        torch.testing.assert_close(stacked, torch.cat([s[level] for s in singles]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sam2_image_predictor_returns_masks_at_image_size_from_a_patched_model(sam2):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    spatialmerge.patch(sam2, "cubist", ratio=0.125, align="window")
    try:
        predictor = SAM2ImagePredictor(sam2)
        picture = np.random.default_rng(0).integers(0, 255, size=(300, 200, 3), dtype=np.uint8)
        predictor.set_image(picture)
        masks, scores, _ = predictor.predict(box=np.array([10, 20, 150, 250]), multimask_output=False)
        state = spatialmerge.patch_state(sam2)
    finally:
        spatialmerge.unpatch(sam2)
    assert masks.shape == (1, 300, 200) and scores.shape == (1,)
    assert state.last_hw == ((64, 64), (56, 56)), "the predictor's encoder ran merged"


@torch.no_grad()
def test_sam2_automatic_mask_generator_runs_unchanged_on_a_patched_model(sam2):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    spatialmerge.patch(sam2, "cubist", ratio=0.125, align="window")
    try:
        generator = SAM2AutomaticMaskGenerator(
            sam2, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0
        )
        picture = np.random.default_rng(1).integers(0, 255, size=(64, 96, 3), dtype=np.uint8)
        masks = generator.generate(picture)
        state = spatialmerge.patch_state(sam2)
    finally:
        spatialmerge.unpatch(sam2)
    assert masks and all(m["segmentation"].shape == (64, 96) for m in masks)
    assert state.last_hw == ((64, 64), (56, 56)), "the encoder ran merged"


def test_the_schedule_is_described_on_the_stage_it_runs_in(sam2):
    described = spatialmerge.describe_schedule(sam2, "cubist", ratio=0.125, align="window")
    assert described["stages"] == [
        {"loc": STAGE3, "r_h": 8, "r_w": 8, "grid_in": [64, 64], "grid_out": [56, 56]}
    ]
    two = spatialmerge.describe_schedule(sam2, "cubist", stages=[[0, 16, 16], [3, 4, 4]])
    # the stage-1 merge is recovered before the q-pools: the second one starts from 64x64 again
    assert [s["grid_in"] for s in two["stages"]] == [[256, 256], [64, 64]]


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("tome", {"r": 4}, "per-layer ToMe .* not supported on SAM 2's Hiera"),
        ("expedite", {"loc": 3, "ratio": 0.125, "windowed": True}, "windowed=true .* not available on SAM 2's Hiera"),
        ("cubist", {"loc": 2, "ratio": 0.125}, r"loc=2 is a q-pool block .* merge before block 3 or later"),
        ("cubist", {"loc": 7, "ratio": 0.125}, r"loc=7 is out of range: this SAM 2 Hiera model has 7 blocks"),
        ("cubist", {"loc": 3, "ratio": 0.125, "positions": "centroid"}, "no rotary position embedding"),
    ],
)
def test_what_hiera_cannot_run_is_refused_naming_the_fix(sam2, method, options, message):
    with pytest.raises(ValueError, match=message):
        spatialmerge.patch(sam2, method, **options)
    assert spatialmerge.patch_state(sam2) is None


def test_building_sam2_leaves_hydra_free_for_the_caller(tmp_path):
    assert not GlobalHydra.instance().is_initialized()
    build_model("sam2_t", trunk=TINY_TRUNK)
    assert not GlobalHydra.instance().is_initialized(), "sam2's import side effect was undone"
    (tmp_path / "app.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        assert compose(config_name="app").x == 1


def test_the_official_checkpoint_format_loads_and_a_missing_file_names_the_release(sam2, tmp_path):
    path = tmp_path / "sam2.1_hiera_base_plus.pt"
    torch.save({"model": sam2.state_dict()}, path)  # the release's layout: weights under "model"
    loaded = build_model("sam2_b+", checkpoint=path, trunk=TINY_TRUNK)
    for key, value in sam2.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointNotFoundError, match=r"sam2\.1_hiera_base_plus\.pt"):
        build_model("sam2_b+", checkpoint=tmp_path / "nothing.pt")


def test_unknown_trunk_sizes_are_refused():
    with pytest.raises(ValueError, match=r"model.trunk keys \['depth'\] are not Hiera size options"):
        build_model("sam2_t", trunk={"depth": 3})
