"""timm Eva as DINOv3 (CLS + 4 registers, RotaryEmbeddingDinoV3) patched with every grid method."""

import math

import pytest
import timm
import torch

import spatialmerge
import spatialmerge.adapters.eva  # noqa: F401  (registers the Eva adapter)
from spatialmerge.adapters.eva import TimmEvaAdapter, grid_coords, rope_from_coords
from spatialmerge.adapters.loops import centroid_coords
from spatialmerge.merging import cubist_merge

PREFIX = 5  # CLS + 4 registers


def tiny_dinov3(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(pretrained=False, img_size=64, depth=4, embed_dim=64, num_heads=2, num_classes=10)
    model = timm.create_model("vit_small_patch16_dinov3", **{**options, **overrides})
    # DINOv3's LayerScale starts at 1e-5, which would make every block (and so every merge) a
    # near no-op on a random model.
    for block in model.blocks:
        torch.nn.init.ones_(block.gamma_1)
        torch.nn.init.ones_(block.gamma_2)
    return model.eval()


def hand_centred(n: int) -> torch.Tensor:
    """DINOv3 coordinates of n cells: centres (i + 0.5) / n mapped from [0, 1] to [-1, 1]."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1


def hand_grid(h: int, w: int) -> torch.Tensor:
    """(H * W, 2) coordinates, [row, column], row-major."""
    ys, xs = torch.meshgrid(hand_centred(h), hand_centred(w), indexing="ij")
    return torch.stack([ys, xs], -1).reshape(h * w, 2)


def hand_rope_table(coords: torch.Tensor, head_dim: int = 32, temperature: float = 100.0) -> torch.Tensor:
    """DINOv3 RoPE by its formula: angle = 2 pi * coordinate / period, periods temperature **
    (2 i / (head_dim / 2)) for i < head_dim / 4; half-rotation layout [y freqs, x freqs] twice;
    table = [sin, cos]. (..., N, 2) -> (..., N, 2 * head_dim)."""
    periods = temperature ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    angles = (2 * math.pi * coords.double()[..., None] / periods).flatten(-2)  # (..., N, head_dim / 2)
    angles = torch.cat([angles, angles], -1)
    return torch.cat([angles.sin(), angles.cos()], -1).float()


def capture_rope(block: torch.nn.Module) -> dict:
    """Record the tokens and the rope table a block is called with."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0].detach().clone()
        seen["rope"] = kwargs["rope"].detach().clone()

    block.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@torch.no_grad()
def test_zero_reduction_matches_unpatched_and_unpatch_restores():
    model = tiny_dinov3()
    x = torch.randn(2, 3, 64, 96)
    expected = model(x)
    for positions in ("grid", "centroid"):
        spatialmerge.patch(model, "cubist", loc=2, r_h=0, r_w=0, positions=positions)
        assert type(model).__name__ == "MergingEva"
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    spatialmerge.unpatch(model)
    assert type(model) is timm.models.eva.Eva
    assert spatialmerge.patch_state(model) is None
    assert torch.equal(model(x), expected)


def reference_forward(model, x, loc, r_h, r_w):
    """Eva's embedding -> blocks before loc (full RoPE) -> cubist_merge on the patch grid ->
    RoPE of the reduced grid -> remaining blocks -> norm -> head."""
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    t, rope = model._pos_embed(model.patch_embed(x))
    t = model.norm_pre(t)
    for block in model.blocks[:loc]:
        t = block(t, rope=rope)
    grid, record = cubist_merge(t[:, PREFIX:].reshape(len(x), h, w, -1), r_h, r_w)
    t = torch.cat([t[:, :PREFIX], grid.flatten(1, 2)], dim=1)
    rope = model.rope.get_embed(shape=list(record.out_hw))
    for block in model.blocks[loc:]:
        t = block(t, rope=rope)
    features = model.norm(t)
    return features, model.forward_head(features)


@pytest.mark.parametrize("dynamic", [True, False])
@torch.no_grad()
def test_cubist_matches_reference_forward(dynamic):
    model = tiny_dinov3(img_size=(64, 96), dynamic_img_size=dynamic)
    x = torch.randn(2, 3, 64, 96)
    features, logits = reference_forward(model, x, loc=2, r_h=1, r_w=2)
    spatialmerge.patch(model, "cubist", loc=2, r_h=1, r_w=2)
    assert model.forward_features(x).shape == (2, PREFIX + 3 * 4, 64)
    torch.testing.assert_close(model.forward_features(x), features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)
    assert spatialmerge.patch_state(model).last_hw == ((4, 6), (3, 4))
    # The positions matter: the full grid's table, cut to size, gives another answer.
    spatialmerge.unpatch(model)
    wrong_rope = model.rope.get_embed(shape=[4, 6])[: 3 * 4]
    t, rope = model._pos_embed(model.patch_embed(x))
    for block in model.blocks[:2]:
        t = block(t, rope=rope)
    grid, _ = cubist_merge(t[:, PREFIX:].reshape(2, 4, 6, -1), 1, 2)
    t = torch.cat([t[:, :PREFIX], grid.flatten(1, 2)], dim=1)
    for block in model.blocks[2:]:
        t = block(t, rope=wrong_rope)
    assert not torch.allclose(model.norm(t), features, atol=1e-3)


def test_dinov3_coordinates_are_centred_and_normalised():
    model = tiny_dinov3()
    torch.testing.assert_close(grid_coords(model.rope, (3, 4)), hand_grid(3, 4).float())
    corners = grid_coords(model.rope, (3, 4))[[0, -1]]
    torch.testing.assert_close(corners, torch.tensor([[-(1 - 1 / 3), -(1 - 1 / 4)], [1 - 1 / 3, 1 - 1 / 4]]))
    torch.testing.assert_close(model.rope.get_embed(shape=[3, 4]), hand_rope_table(hand_grid(3, 4)))


@torch.no_grad()
def test_grid_positions_are_a_uniform_reduced_grid_over_the_same_extent():
    model = tiny_dinov3()
    seen = capture_rope(model.blocks[2])
    after = capture_rope(model.blocks[3])
    spatialmerge.patch(model, "cubist", loc=2, r_h=1, r_w=2, positions="grid")
    model(torch.randn(2, 3, 64, 96))  # 4 x 6 patches -> 3 x 4
    assert seen["rope"].shape == (3 * 4, 64)  # one table for the batch
    # Centres of a uniform 3 x 4 grid: rows -2/3, 0, 2/3; columns -3/4, -1/4, 1/4, 3/4.
    expected = hand_rope_table(hand_grid(3, 4))
    torch.testing.assert_close(seen["rope"], expected, atol=1e-5, rtol=0)
    assert torch.equal(after["rope"], seen["rope"])


def test_centroid_coords_hand_example():
    coords = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assignment = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    expected = torch.tensor(
        [
            [[0.0, 0.5], [1.0, 0.5], [9.0, 9.0]],  # token 2 holds nothing: falls back
            [[0.0, 0.0], [2 / 3, 2 / 3], [9.0, 9.0]],
        ]
    )
    fallback = torch.full((3, 2), 9.0)
    torch.testing.assert_close(centroid_coords(coords, assignment, 3, fallback=fallback), expected)


def test_rope_from_coords_matches_the_rope_layout():
    model = tiny_dinov3()
    coords = torch.rand(2, 7, 2) * 2 - 1
    table = rope_from_coords(model.rope, coords)
    assert table.shape == (2, 1, 7, 64)
    torch.testing.assert_close(table[:, 0], hand_rope_table(coords), atol=1e-5, rtol=0)


@torch.no_grad()
def test_centroid_positions_are_the_mean_of_the_absorbed_cells():
    model = tiny_dinov3()
    seen = capture_rope(model.blocks[2])
    spatialmerge.patch(model, "cubist", loc=2, r_h=1, r_w=2, positions="centroid")
    x = torch.randn(2, 3, 64, 96)
    model(x)
    assignment = spatialmerge.patch_state(model).last_assignment  # (B, 4 * 6) -> index in 3 x 4
    cells = hand_grid(4, 6)
    means = torch.zeros(2, 12, 2, dtype=torch.float64)
    for b in range(2):
        for token in range(12):
            held = cells[assignment[b] == token]
            assert len(held) >= 1
            means[b, token] = held.mean(0)
    assert seen["rope"].shape == (2, 1, 12, 64)
    torch.testing.assert_close(seen["rope"][:, 0], hand_rope_table(means), atol=1e-5, rtol=0)
    # Merging is uneven, so centroids move off the uniform grid and change the result.
    assert not torch.allclose(means, hand_grid(3, 4).expand(2, -1, -1))
    centroid_out = model.forward_features(x)
    spatialmerge.patch(model, "cubist", loc=2, r_h=1, r_w=2, positions="grid")
    assert not torch.allclose(model.forward_features(x), centroid_out, atol=1e-3)


@torch.no_grad()
def test_prefix_tokens_are_never_merged():
    model = tiny_dinov3()
    x = torch.randn(2, 3, 64, 96)
    seen = capture_rope(model.blocks[2])
    model(x)
    unmerged = seen["x"]
    spatialmerge.patch(model, "cubist", loc=2, r_h=1, r_w=2)
    model(x)
    merged = seen["x"]
    assert merged.shape == (2, PREFIX + 12, 64)
    assert torch.equal(merged[:, :PREFIX], unmerged[:, :PREFIX])
    grid, _ = cubist_merge(unmerged[:, PREFIX:].reshape(2, 4, 6, 64), 1, 2)
    torch.testing.assert_close(merged[:, PREFIX:], grid.flatten(1, 2))


@pytest.mark.parametrize("hw", [(64, 64), (80, 112)])
@torch.no_grad()
def test_recover_gives_full_grid_features(hw):
    model = tiny_dinov3()
    x = torch.randn(3, 3, *hw)
    h, w = hw[0] // 16, hw[1] // 16
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=2, recover=True)
    features = model.forward_features(x)
    assert features.shape == (3, PREFIX + h * w, 64)
    # Recovery copies a token to every cell it holds.
    assignment = spatialmerge.patch_state(model).last_assignment
    patches = features[:, PREFIX:]
    for b in range(3):
        first = {}
        for cell, token in enumerate(assignment[b].tolist()):
            torch.testing.assert_close(patches[b, cell], patches[b, first.setdefault(token, cell)])
    assert len(set(assignment[0].tolist())) == (h - 1) * (w - 2)


@torch.no_grad()
def test_forward_intermediates_recovers_dense_maps():
    model = tiny_dinov3()
    x = torch.randn(2, 3, 64, 96)
    final_plain, maps_plain = model.forward_intermediates(x, indices=[0, 3])
    spatialmerge.patch(model, "cubist", loc=2, r_h=1, r_w=2)
    final, maps = model.forward_intermediates(x, indices=[0, 3])
    assert final.shape == (2, PREFIX + 12, 64)
    assert [m.shape for m in maps] == [m.shape for m in maps_plain] == [(2, 64, 4, 6)] * 2
    torch.testing.assert_close(maps[0], maps_plain[0])  # before the merge: untouched
    assignment = spatialmerge.patch_state(model).last_assignment
    late = maps[1].flatten(2)  # (B, C, H * W)
    for b in range(2):
        for token in range(12):
            cells = late[b][:, assignment[b] == token]
            torch.testing.assert_close(cells, cells[:, :1].expand_as(cells))
    pairs = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert pairs[0][0].shape == (2, 64, 4, 6) and pairs[0][1].shape == (2, PREFIX, 64)


@pytest.mark.parametrize("positions", ["grid", "centroid"])
@torch.no_grad()
def test_bf16_forward(positions):
    model = tiny_dinov3().to(torch.bfloat16)
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=2, positions=positions)
    out = model.forward_features(torch.randn(2, 3, 64, 96, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, PREFIX + 12, 64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_through_the_merge(checkpointing):
    model = tiny_dinov3().train()
    model.set_grad_checkpointing(checkpointing)
    spatialmerge.patch(model, "cubist", loc=2, r_h=1, r_w=2, positions="centroid")
    model(torch.randn(2, 3, 64, 96)).square().sum().backward()
    params = (model.patch_embed.proj.weight, model.blocks[0].attn.qkv.weight, model.blocks[3].mlp.fc1.weight)
    for param in params:
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["tome", "expedite", "oracle"])
@pytest.mark.parametrize("positions", ["grid", "centroid"])
@torch.no_grad()
def test_single_layer_baselines_shapes(method, positions):
    model = tiny_dinov3()
    x = torch.randn(2, 3, 64, 96)
    options = dict(k=4) if method == "expedite" else {}
    spatialmerge.patch(model, method, loc=2, r_h=1, r_w=2, positions=positions, **options)
    assert model.forward_features(x).shape == (2, PREFIX + 12, 64)
    assert model(x).shape == (2, 10)
    spatialmerge.patch(model, method, loc=2, r_h=1, r_w=2, positions=positions, recover=True, **options)
    assert model.forward_features(x).shape == (2, PREFIX + 24, 64)


@pytest.mark.parametrize("fused", [True, False])
@torch.no_grad()
def test_keys_metric(fused):
    model = tiny_dinov3(qkv_fused=fused)
    attn = model.blocks[1].attn
    t = torch.randn(2, 3, 4, 64)
    keys = TimmEvaAdapter().keys(model.blocks[1], t)
    k = attn.qkv(t)[..., 64:128] if fused else attn.k_proj(t)  # heads of 32 channels
    torch.testing.assert_close(keys, (k[..., :32] + k[..., 32:]) / 2)
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=2, metric="keys")
    assert model.forward_features(torch.randn(2, 3, 64, 96)).shape == (2, PREFIX + 12, 64)


def test_per_layer_tome_is_rejected():
    model = tiny_dinov3()
    with pytest.raises(ValueError, match=r"per-layer ToMe.*VisionTransformer"):
        spatialmerge.patch(model, "tome", r=2)
    assert type(model) is timm.models.eva.Eva


def test_unsupported_rope_is_rejected():
    torch.manual_seed(0)
    mixed = timm.create_model(
        "vit_small_patch16_rope_mixed_224", pretrained=False, img_size=64, depth=2, embed_dim=64, num_heads=2
    )
    with pytest.raises(ValueError, match="RotaryEmbeddingDinoV3"):
        spatialmerge.patch(mixed, "cubist", loc=1, r_h=1, r_w=1)


def test_runtime_limits_are_clear():
    model = tiny_dinov3(rope_shift_coords=0.1)
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=1)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        model.forward_features(x, attn_mask=torch.ones(1, 1, 21, 21, dtype=torch.bool))
    model.train()
    with pytest.raises(NotImplementedError, match=r"model\.rope\.eval\(\)"):
        model(x)
    model.rope.eval()
    assert model(x).shape == (1, 10)
