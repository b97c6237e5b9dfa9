"""SAM encoders (segment-anything and timm samvit) patched with every grid method."""

from functools import partial

import numpy as np
import pytest
import timm
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

import spatialmerge
from spatialmerge.merging import cubist_merge, cubist_recover


def tiny_encoder(img_size: int = 256, window: int = 4) -> ImageEncoderViT:
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=64,
        depth=4,
        num_heads=2,
        use_rel_pos=True,
        global_attn_indexes=(1, 3),
        window_size=window,
        out_chans=32,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    # rel-pos tables start at zero; random values make the interpolation path matter.
    for block in encoder.blocks:
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    return encoder.eval()


def tiny_sam(img_size: int = 128) -> Sam:
    encoder = tiny_encoder(img_size)
    grid = img_size // 16
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    )
    return sam.eval()


def reference_forward(encoder, x, loc, r_h, r_w):
    """Embed -> blocks before loc -> cubist_merge -> remaining blocks -> recover -> neck."""
    t = encoder.patch_embed(x) + encoder.pos_embed
    for block in encoder.blocks[:loc]:
        t = block(t)
    t, record = cubist_merge(t, r_h, r_w)
    for block in encoder.blocks[loc:]:
        t = block(t)
    return encoder.neck(cubist_recover(t, record).permute(0, 3, 1, 2))


@torch.no_grad()
def test_zero_reduction_equals_unpatched_and_unpatch_restores():
    encoder = tiny_encoder()
    x = torch.randn(2, 3, 256, 256)
    expected = encoder(x)
    spatialmerge.patch(encoder, "cubist", loc=1, r_h=0, r_w=0)
    assert type(encoder).__name__ == "MergingImageEncoderViT"
    torch.testing.assert_close(encoder(x), expected, atol=1e-6, rtol=0)
    spatialmerge.patch(encoder, "cubist", loc=1, r_h=3, r_w=2)
    assert not torch.allclose(encoder(x), expected, atol=1e-4)
    spatialmerge.unpatch(encoder)
    assert type(encoder) is ImageEncoderViT
    assert not hasattr(encoder, "_spatialmerge")
    assert torch.equal(encoder(x), expected)


@torch.no_grad()
@pytest.mark.parametrize(("loc", "r_h", "r_w"), [(1, 3, 2), (2, 5, 5), (0, 1, 7)])
def test_cubist_matches_hand_written_reference(loc, r_h, r_w):
    # 16x16 grid, window 4: reduced sides such as 13 or 9 are not window multiples (padding path),
    # r_h != r_w gives non-square grids to the global blocks' rel-pos interpolation.
    encoder = tiny_encoder()
    x = torch.randn(2, 3, 256, 256)
    expected = reference_forward(encoder, x, loc, r_h, r_w)
    spatialmerge.patch(encoder, "cubist", loc=loc, r_h=r_h, r_w=r_w)
    torch.testing.assert_close(encoder(x), expected, atol=1e-5, rtol=1e-5)
    assert spatialmerge.patch_state(encoder).last_hw == ((16, 16), (16 - r_h, 16 - r_w))


@torch.no_grad()
def test_sam_wrapper_patches_its_encoder_and_predictor_returns_full_size_masks():
    sam = tiny_sam()
    spatialmerge.patch(sam, "cubist", loc=1, ratio=0.25)
    assert spatialmerge.patch_state(sam) is not None
    predictor = SamPredictor(sam)
    image = np.random.default_rng(0).integers(0, 255, size=(90, 120, 3), dtype=np.uint8)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(box=np.array([10, 10, 60, 50]), multimask_output=False)
    assert masks.shape == (1, 90, 120) and scores.shape == (1,)
    assert spatialmerge.patch_state(sam).last_hw == ((8, 8), (6, 6))
    spatialmerge.unpatch(sam)
    assert type(sam.image_encoder) is ImageEncoderViT


@torch.no_grad()
def test_automatic_mask_generator_runs_unchanged_on_a_patched_sam():
    sam = tiny_sam()
    spatialmerge.patch(sam, "cubist", loc=1, ratio=0.25)
    generator = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    image = np.random.default_rng(1).integers(0, 255, size=(64, 96, 3), dtype=np.uint8)
    masks = generator.generate(image)
    assert masks and all(m["segmentation"].shape == (64, 96) for m in masks)
    assert spatialmerge.patch_state(sam).last_hw == ((8, 8), (6, 6)), "the encoder ran merged"


@torch.no_grad()
@pytest.mark.parametrize("method", ["cubist", "tome", "expedite", "oracle", "pool"])
def test_every_grid_method_runs_and_recovers_full_grid(method):
    encoder = tiny_encoder()
    x = torch.randn(2, 3, 256, 256)
    # expedite on the whole grid here; its per-window form (SAM's default) is tested below
    options = {"k": 4, "windowed": False} if method == "expedite" else {}
    spatialmerge.patch(encoder, method, loc=1, ratio=0.2, **options)
    out = encoder(x)
    assert out.shape == (2, 32, 16, 16) and torch.isfinite(out).all()
    state = spatialmerge.patch_state(encoder)
    assert state.last_hw == ((16, 16), (13, 13))
    assert state.last_assignment.shape == (2, 256)
    assert state.last_assignment.max() < 13 * 13


@torch.no_grad()
def test_metric_variants_and_several_stages_and_window_alignment():
    encoder = tiny_encoder()
    x = torch.randn(1, 3, 256, 256)
    for metric in ("keys", "normed"):
        spatialmerge.patch(encoder, "cubist", loc=1, r_h=2, r_w=2, metric=metric)
        assert encoder(x).shape == (1, 32, 16, 16)
    spatialmerge.patch(encoder, "cubist", stages=[(1, 2, 3), (2, 3, 1)])
    encoder(x)
    assert spatialmerge.patch_state(encoder).last_hw == ((16, 16), (11, 12))
    spatialmerge.patch(encoder, "cubist", loc=1, ratio=0.3, align="window")
    encoder(x)
    assert spatialmerge.patch_state(encoder).last_hw == ((16, 16), (12, 12)), "16 -> 12 = 3 windows of 4"


def test_bf16_forward_runs():
    encoder = tiny_encoder().to(torch.bfloat16)
    spatialmerge.patch(encoder, "cubist", loc=1, r_h=2, r_w=2)
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, 256, 256, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gradients_reach_the_patch_embedding_through_the_merge():
    encoder = tiny_encoder().train()
    spatialmerge.patch(encoder, "cubist", loc=1, r_h=2, r_w=2)
    encoder(torch.randn(1, 3, 256, 256)).sum().backward()
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_timm_samvit_patched_equals_reference_and_handles_non_square_images():
    torch.manual_seed(0)
    model = timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=128, depth=4, embed_dim=64, num_heads=2,
        global_attn_indexes=(1, 3), window_size=4, neck_chans=32,
    ).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
    x = torch.randn(2, 3, 128, 128)
    expected = model.forward_features(x)
    spatialmerge.patch(model, "cubist", loc=2, r_h=0, r_w=0)
    torch.testing.assert_close(model.forward_features(x), expected, atol=1e-6, rtol=0)
    spatialmerge.patch(model, "cubist", loc=2, r_h=2, r_w=3)
    t = model.patch_embed(x) + model.pos_embed
    for block in model.blocks[:2]:
        t = block(t)
    t, record = cubist_merge(t, 2, 3)
    for block in model.blocks[2:]:
        t = block(t)
    reference = model.neck(cubist_recover(t, record).permute(0, 3, 1, 2))
    torch.testing.assert_close(model.forward_features(x), reference, atol=1e-5, rtol=1e-5)
    wide = model.forward_features(torch.randn(1, 3, 96, 160))
    assert wide.shape == (1, 32, 6, 10)
    assert spatialmerge.patch_state(model).last_hw == ((6, 10), (4, 7))


def test_user_mistakes_get_clear_messages():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match=r"loc=9 is out of range: .* 4 blocks, so loc must be in \[0, 3\]"):
        spatialmerge.patch(encoder, "cubist", loc=9, r_h=1, r_w=1)
    with pytest.raises(ValueError, match=r"ratio=0.6 .* 0 <= ratio < 0.5"):
        spatialmerge.patch(encoder, "cubist", loc=1, ratio=0.6)
    with pytest.raises(ValueError, match="method='magic' .* cubist"):
        spatialmerge.patch(encoder, "magic", loc=1, ratio=0.1)
    with pytest.raises(ValueError, match="set both, or a ratio"):
        spatialmerge.patch(encoder, "cubist", loc=1, r_h=2)
    with pytest.raises(ValueError, match="per-layer"):
        spatialmerge.patch(encoder, "cubist", r=4)
    with pytest.raises(TypeError, match="not supported by spatialmerge; supported model types: .*ImageEncoderViT"):
        spatialmerge.patch(torch.nn.Linear(2, 2), "cubist", loc=0, ratio=0.1)
    with pytest.raises(ValueError, match=r"r_h=9 is out of range for a side of 16"):  # when patched, not run
        spatialmerge.patch(encoder, "cubist", loc=1, r_h=9, r_w=0)


def test_timm_samvit_forward_intermediates_refuses_when_patched():
    model = timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=64, depth=2, embed_dim=32, num_heads=2,
        global_attn_indexes=(1,), window_size=2, neck_chans=16,
    ).eval()
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=1)
    with pytest.raises(NotImplementedError, match="forward_intermediates runs the backbone's own block loop"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64))


def _expedit_sam_reference(encoder: ImageEncoderViT, x: torch.Tensor, loc: int, side: int, **options) -> torch.Tensor:
    """Expedit-SAM's forward written out: each window clustered on its own into side x side
    centroids, later window blocks built with window ``side``, each window reconstructed before
    the neck."""
    import copy

    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    from spatialmerge.merging import expedite_cluster, expedite_reconstruct

    reference = copy.deepcopy(encoder)
    window = max(block.window_size for block in reference.blocks)
    for block in reference.blocks[loc:]:
        if block.window_size:
            block.window_size = side
    t = reference.patch_embed(x) + reference.pos_embed
    h, w = t.shape[1:3]
    for i, block in enumerate(reference.blocks):
        if i == loc:
            windows, pad_hw = window_partition(t, window)
            centroids, record = expedite_cluster(windows, (side, side), **options)
            grid = (pad_hw[0] // window * side, pad_hw[1] // window * side)
            t = window_unpartition(centroids, side, grid, grid)
        t = block(t)
    windows, _ = window_partition(t, side)
    t = window_unpartition(expedite_reconstruct(windows, record), window, pad_hw, (h, w))
    return reference.neck(t.permute(0, 3, 1, 2))


@torch.no_grad()
@pytest.mark.parametrize(("window", "reduced"), [(4, 12), (5, 12)])  # 16x16 in 4x4 windows; padded to 20x20 in 4x4 windows of 5
def test_expedite_on_sam_is_expedit_sams_per_window_clustering(window, reduced):
    encoder = tiny_encoder(window=window)
    x = torch.randn(2, 3, 256, 256)
    options = dict(n_iters=3, temperature=0.1, window_size=5, k=4, reconstruct="l2")
    expected = _expedit_sam_reference(encoder, x, 1, 3, **options)
    spatialmerge.patch(encoder, "expedite", loc=1, ratio=0.25, k=4)  # the rest: SAM's defaults
    state = spatialmerge.patch_state(encoder)
    assert state.config.windowed and state.config.grid_options() == options
    out = encoder(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert state.last_hw == ((16, 16), (reduced, reduced))
    assert [block.window_size for block in encoder.blocks] == [window, 0, window, 0], "blocks restored"


def test_per_window_budget_names_what_it_cannot_do():
    encoder = tiny_encoder()
    x = torch.randn(1, 3, 256, 256)
    with pytest.raises(ValueError, match="square windows.*3 x 2 tokens per 4x4 window"):
        spatialmerge.patch(encoder, "expedite", loc=1, r_h=4, r_w=8, k=4)
        encoder(x)
    with pytest.raises(ValueError, match="rounds to 4x4 tokens per 4x4 window: nothing would be merged"):
        spatialmerge.patch(encoder, "expedite", loc=1, r_h=1, r_w=1, k=4)
        encoder(x)
    spatialmerge.unpatch(encoder)
    assert [block.window_size for block in encoder.blocks] == [4, 0, 4, 0]


def test_per_layer_tome_is_refused_on_sam_instead_of_running_unmerged():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="per-layer ToMe .* not supported on SAM encoders.*single-layer ToMe"):
        spatialmerge.patch(encoder, "tome", r=2)
    assert spatialmerge.patch_state(encoder) is None
    with pytest.raises(ValueError, match="positions='centroid' places merged tokens for RoPE.*positions=grid"):
        spatialmerge.patch(encoder, "cubist", loc=1, ratio=0.25, positions="centroid")


@torch.no_grad()
def test_a_ratio_too_small_for_the_grid_is_refused_when_patching():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="rounds to r_h=r_w=0: nothing would be merged"):
        spatialmerge.patch(encoder, "cubist", loc=1, ratio=0.02)  # 16 * 0.02 rounds to 0
