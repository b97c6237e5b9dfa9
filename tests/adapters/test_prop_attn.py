"""Proportional attention (``prop_attn``) on every backbone family: each patched forward equals a
forward written by hand from the description (softmax(q k^T * scale [+ rel-pos] + log(size) of
each key) v, prefix tokens and window padding unbiased), nothing changes where nothing merged,
and cell sizes add up and compose."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from segment_anything.modeling import image_encoder as sam_modeling
from timm.layers import apply_rot_embed_cat

import spatialmerge
from spatialmerge.adapters import patch_state
from spatialmerge.adapters.attention import key_bias
from spatialmerge.merging import cubist_merge, cubist_recover

sys.path.insert(0, str(Path(__file__).parent))
from test_eva import tiny_dinov3  # noqa: E402
from test_hiera import sam2  # noqa: E402,F401  (the tiny SAM 2 fixture)
from test_hf import tiny  # noqa: E402
from test_sam import tiny_encoder  # noqa: E402
from test_vit import embed, tiny_deit, tiny_registers  # noqa: E402


def log_sizes(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N) cell -> token map -> (B, num_tokens) log of how many cells each token holds."""
    return torch.stack([torch.bincount(row, minlength=num_tokens) for row in index]).float().log()


def attend(q, k, v, logits_bias):
    """Attention by hand: softmax(q k^T / sqrt(d) + bias) v over (..., N, d)."""
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + logits_bias
    return logits.softmax(-1) @ v


# ---------------------------------------------------------------- timm ViT / DeiT / registers


def vit_block(block, x, bias):
    """timm Block by hand with a per-key bias (B, N)."""
    b, n, c = x.shape
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    a = attend(q, k, v, bias[:, None, None, :]).transpose(1, 2).reshape(b, n, c)
    x = x + block.ls1(attn.proj(a))
    return x + block.ls2(block.mlp(block.norm2(x)))


@pytest.mark.parametrize("build", [tiny_deit, tiny_registers])
@torch.no_grad()
def test_timm_vit_equals_hand_written_attention_with_log_size_bias(build):
    model = build()
    x = torch.randn(2, 3, *((96, 96) if build is tiny_deit else (56, 56)), generator=torch.Generator().manual_seed(1))
    loc, r = 1, 2
    t, (h, w) = embed(model, x)
    prefix = model.num_prefix_tokens
    for block in model.blocks[:loc]:
        t = block(t)
    grid, record = cubist_merge(t[:, prefix:].unflatten(1, (h, w)), r, r)
    t = torch.cat([t[:, :prefix], grid.flatten(1, 2)], 1)
    bias = torch.cat([torch.zeros(2, prefix), log_sizes(record.index, (h - r) * (w - r))], 1)
    for block in model.blocks[loc:]:
        t = vit_block(block, t, bias)
    grid = cubist_recover(t[:, prefix:].unflatten(1, (h - r, w - r)), record)
    expected = model.norm(torch.cat([t[:, :prefix], grid.flatten(1, 2)], 1))

    spatialmerge.patch(model, "cubist", loc=loc, r_h=r, r_w=r, recover=True, prop_attn=True)
    torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)
    spatialmerge.patch(model, "cubist", loc=loc, r_h=r, r_w=r, recover=True)  # the paper: no bias
    assert (model.forward_features(x) - expected).abs().max() > 1e-3


# ---------------------------------------------------------------- timm Eva (DINOv3, RoPE)


def eva_block(block, x, rope, bias, prefix):
    b, n, c = x.shape
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=True)], 2)
    k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=True)], 2)
    a = attend(q, k, v, bias[:, None, None, :]).transpose(1, 2).reshape(b, n, c)
    x = x + block.gamma_1 * attn.proj(attn.norm(a))
    return x + block.gamma_2 * block.mlp(block.norm2(x))


@torch.no_grad()
def test_timm_eva_with_rope_equals_hand_written_attention_with_log_size_bias():
    model = tiny_dinov3()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    loc, r, prefix = 1, 1, model.num_prefix_tokens
    t, rope = model._pos_embed(model.patch_embed(x))
    for block in model.blocks[:loc]:
        t = block(t, rope=rope)
    grid, record = cubist_merge(t[:, prefix:].unflatten(1, (4, 4)), r, r)
    t = torch.cat([t[:, :prefix], grid.flatten(1, 2)], 1)
    rope = model.rope.get_embed(shape=[4 - r, 4 - r])
    bias = torch.cat([torch.zeros(2, prefix), log_sizes(record.index, (4 - r) ** 2)], 1)
    for block in model.blocks[loc:]:
        t = eva_block(block, t, rope, bias, prefix)
    expected = model.norm(t)

    spatialmerge.patch(model, "cubist", loc=loc, r_h=r, r_w=r, prop_attn=True)
    torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- segment-anything SAM


def sam_block(block, x, log_size):
    """segment-anything Block by hand; ``log_size`` (B, H, W) is windowed like the tokens."""
    shortcut, (height, width) = x, x.shape[1:3]
    x = block.norm1(x)
    sizes = log_size[..., None]
    if block.window_size > 0:
        x, pad = sam_modeling.window_partition(x, block.window_size)
        sizes, _ = sam_modeling.window_partition(sizes, block.window_size)  # padding: 0
    bw, hh, ww, c = x.shape
    attn = block.attn
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(bw, hh * ww, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, Bw, heads, N, d)
    q, k, v = qkv[0], qkv[1], qkv[2]
    rel = sam_modeling.add_decomposed_rel_pos(
        torch.zeros(bw * heads, hh * ww, hh * ww), q.reshape(bw * heads, hh * ww, -1),
        attn.rel_pos_h, attn.rel_pos_w, (hh, ww), (hh, ww),
    ).view(bw, heads, hh * ww, hh * ww)
    a = attend(q, k, v, rel + sizes.reshape(bw, 1, 1, hh * ww))  # (Bw, heads, N, d)
    x = attn.proj(a.permute(0, 2, 1, 3).reshape(bw, hh, ww, c))
    if block.window_size > 0:
        x = sam_modeling.window_unpartition(x, block.window_size, pad, (height, width))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


@torch.no_grad()
def test_sam_with_padded_windows_and_a_global_block_equals_hand_written_attention():
    encoder = tiny_encoder(img_size=256, window=4)  # 16x16 grid, blocks 1 and 3 global
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    loc, r = 1, 3  # 13x13: windows of 4 pad it to 16
    t = encoder.patch_embed(x) + encoder.pos_embed
    for block in encoder.blocks[:loc]:
        t = block(t)
    t, record = cubist_merge(t, r, r)
    log_size = log_sizes(record.index, (16 - r) ** 2).view(1, 16 - r, 16 - r)
    for block in encoder.blocks[loc:]:
        t = sam_block(block, t, log_size)
    expected = encoder.neck(cubist_recover(t, record).permute(0, 3, 1, 2))

    spatialmerge.patch(encoder, "cubist", loc=loc, r_h=r, r_w=r, prop_attn=True)
    torch.testing.assert_close(encoder(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- SAM 2 Hiera


def hiera_block(block, x, log_size):
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    shortcut, (height, width) = x, x.shape[1:3]
    x = block.norm1(x)
    sizes = log_size[..., None]
    if block.window_size > 0:
        x, pad = window_partition(x, block.window_size)
        sizes, _ = window_partition(sizes, block.window_size)
    bw, hh, ww, c = x.shape
    attn = block.attn
    qkv = attn.qkv(x).reshape(bw, hh * ww, 3, attn.num_heads, -1)
    q, k, v = (t.transpose(1, 2) for t in torch.unbind(qkv, 2))  # (Bw, heads, N, d)
    a = attend(q, k, v, sizes.reshape(bw, 1, 1, hh * ww)).transpose(1, 2).reshape(bw, hh, ww, -1)
    x = attn.proj(a)
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, pad, (height, width))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


@torch.no_grad()
def test_hiera_equals_hand_written_attention_with_log_size_bias(sam2):
    trunk = sam2.image_encoder.trunk
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    loc, r = 3, 4  # stage 3 (blocks 2-5, 64x64, 14-windows, block 4 global): 60x60 pads to 70
    t = trunk.patch_embed(x)
    t = t + trunk._get_pos_embed(t.shape[1:3])
    expected, record, log_size = [], None, None
    for i, block in enumerate(trunk.blocks):
        if i == loc:
            t, record = cubist_merge(t, r, r)
            log_size = log_sizes(record.index, (64 - r) ** 2).view(1, 64 - r, 64 - r)
        t = block(t) if record is None else hiera_block(block, t, log_size)
        if i in trunk.stage_ends:
            if record is not None:
                t, record = cubist_recover(t, record), None
            expected.append(t.permute(0, 3, 1, 2))

    spatialmerge.patch(sam2, "cubist", loc=loc, r_h=r, r_w=r, prop_attn=True)
    try:
        for got, want in zip(trunk(x), expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        spatialmerge.unpatch(sam2)


# ---------------------------------------------------------------- transformers


def dinov2_layer(layer, x, bias):
    b, n, c = x.shape
    attention = layer.attention
    heads = attention.config.num_attention_heads
    q, k, v = (proj(layer.norm1(x)).view(b, n, heads, -1).transpose(1, 2)
               for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    a = attend(q, k, v, bias[:, None, None, :]).transpose(1, 2).reshape(b, n, c)
    x = x + layer.layer_scale1(attention.o_proj(a))
    return x + layer.layer_scale2(layer.mlp(layer.norm2(x)))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_transformers_dinov2_equals_hand_written_attention_with_log_size_bias(implementation):
    model = tiny("Dinov2Model", attn_implementation=implementation)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    loc, r = 1, 2
    t = model.embeddings(x)
    for layer in model.encoder.layer[:loc]:
        t = layer(t, None)
    grid, record = cubist_merge(t[:, 1:].unflatten(1, (8, 8)), r, r)
    t = torch.cat([t[:, :1], grid.flatten(1, 2)], 1)
    bias = torch.cat([torch.zeros(2, 1), log_sizes(record.index, (8 - r) ** 2)], 1)
    for layer in model.encoder.layer[loc:]:
        t = dinov2_layer(layer, t, bias)
    expected = model.layernorm(t)

    spatialmerge.patch(model, "cubist", loc=loc, r_h=r, r_w=r, prop_attn=True)
    torch.testing.assert_close(model(pixel_values=x).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def tiny_hf_sam(implementation: str) -> torch.nn.Module:
    config = transformers.SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=16,
        window_size=3, global_attn_indexes=[1], output_channels=16, mlp_dim=64, use_rel_pos=True,
        attn_implementation=implementation,
    )
    torch.manual_seed(0)
    model = transformers.SamVisionModel(config).eval()
    for parameter in model.parameters():  # the default init makes every output ~1e-20
        torch.nn.init.normal_(parameter, std=0.3)
    return model


def tiny_samvit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=128, embed_dim=64, depth=2, num_heads=2,
        global_attn_indexes=(1,), window_size=3, neck_chans=32,
    ).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    return model


# ---------------------------------------------------------------- every family


def _families(sam2_model):
    return {
        "timm vit": (tiny_deit(), torch.randn(2, 3, 96, 96), lambda m, x: m.forward_features(x)),
        "timm eva": (tiny_dinov3(), torch.randn(2, 3, 64, 64), lambda m, x: m.forward_features(x)),
        "segment-anything": (tiny_encoder(128), torch.randn(1, 3, 128, 128), lambda m, x: m(x)),
        "timm samvit": (tiny_samvit(), torch.randn(1, 3, 128, 128), lambda m, x: m.forward_features(x)),
        "hiera": (sam2_model, torch.randn(1, 3, 1024, 1024), lambda m, x: m.image_encoder(x)["backbone_fpn"][-1]),
        "transformers dinov2": (tiny("Dinov2Model"), torch.randn(2, 3, 64, 64),
                                lambda m, x: m(pixel_values=x).last_hidden_state),
        "transformers sam eager": (tiny_hf_sam("eager"), torch.randn(1, 3, 128, 128),
                                   lambda m, x: m(pixel_values=x).last_hidden_state),
        "transformers sam sdpa": (tiny_hf_sam("sdpa"), torch.randn(1, 3, 128, 128),
                                  lambda m, x: m(pixel_values=x).last_hidden_state),
    }


FAMILY_NAMES = ["timm vit", "timm eva", "segment-anything", "timm samvit", "hiera", "transformers dinov2",
                "transformers sam eager", "transformers sam sdpa"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_nothing_merged_with_prop_attn_is_the_unpatched_model_bit_for_bit(family, sam2):
    model, x, forward = _families(sam2)[family]
    loc = 3 if family == "hiera" else 1
    expected = forward(model, x)
    spatialmerge.patch(model, "cubist", loc=loc, r_h=0, r_w=0, prop_attn=True)
    try:
        assert torch.equal(forward(model, x), expected)
        # ... while a real merge with the bias changes the output, against the merge without it
        spatialmerge.patch(model, "cubist", loc=loc, r_h=1, r_w=1, prop_attn=True)
        biased = forward(model, x)
        spatialmerge.patch(model, "cubist", loc=loc, r_h=1, r_w=1)
        assert (forward(model, x) - biased).abs().max() > 1e-6
    finally:
        spatialmerge.unpatch(model)


@pytest.mark.parametrize("family", ["segment-anything", "timm samvit", "transformers sam eager",
                                    "transformers sam sdpa"])
@torch.no_grad()
def test_the_attention_wrapper_at_zero_bias_is_the_stock_attention_bit_for_bit(family, sam2):
    model, _, _ = _families(sam2)[family]
    blocks = getattr(model, "blocks", None) or model.vision_encoder.layers
    for block in blocks:  # a window block and a global block
        x = torch.randn(4, 3, 3, blocks[0].attn.qkv.in_features) if block.window_size else \
            torch.randn(1, 8, 8, blocks[0].attn.qkv.in_features)
        stock = block.attn(x)
        with key_bias(block.attn, torch.zeros(x.shape[0], x.shape[1] * x.shape[2])):
            wrapped = block.attn(x)
        stock, wrapped = (out[0] if isinstance(out, tuple) else out for out in (stock, wrapped))
        assert torch.equal(stock, wrapped)
        assert "forward" not in vars(block.attn)  # the stock forward is back


@torch.no_grad()
def test_the_attention_wrapper_adds_the_bias_the_way_a_mask_would():
    """Hiera's attention (SDPA without a mask) under key_bias equals SDPA given the bias as its
    mask: the bias lands on the right window, head and key."""
    from sam2.modeling.backbones.hieradet import MultiScaleAttention

    torch.manual_seed(0)
    attn = MultiScaleAttention(16, 16, num_heads=2).eval()
    x = torch.randn(3, 4, 4, 16)
    bias = torch.randn(3, 16)
    with key_bias(attn, bias):
        got = attn(x)
    qkv = attn.qkv(x).reshape(3, 16, 3, 2, 8)
    q, k, v = (t.transpose(1, 2) for t in torch.unbind(qkv, 2))
    expected = attn.proj(attend(q, k, v, bias[:, None, None, :]).transpose(1, 2).reshape(3, 4, 4, 16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_an_attention_the_bias_cannot_reach_is_refused_not_left_unbiased():
    class NoSoftmax(torch.nn.Module):
        def forward(self, x):
            return x * 2

    module = NoSoftmax()
    with pytest.raises(RuntimeError, match="exactly one was expected"):
        with key_bias(module, torch.zeros(1, 4)):
            module(torch.randn(1, 2, 2, 3))
    assert "forward" not in vars(module)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("method", ["cubist", "tome", "expedite", "oracle", "pool"])
@torch.no_grad()
def test_cell_sizes_sum_to_the_grid_for_every_grid_method(method):
    model = tiny_deit()
    options = {"k": 4} if method == "expedite" else {}  # 16 centroids: fewer than the default k
    spatialmerge.patch(model, method, loc=1, r_h=2, r_w=2, prop_attn=True, **options)
    run = patch_state(model).run(model)
    grid = torch.randn(2, 6, 6, 64)
    run.before_block(1, grid, model.blocks[1])
    sizes = run.cell_sizes()
    assert sizes.shape == (2, 4, 4)
    assert torch.equal(sizes.sum((1, 2)), torch.full((2,), 36.0))
    bias = run.key_bias(1, torch.float32)
    assert bias.shape == (2, 1, 1, 17) and torch.equal(bias[..., 0], torch.zeros(2, 1, 1))
    if method != "expedite":  # an empty Expedite cluster counts as one patch in the bias
        torch.testing.assert_close(bias[:, 0, 0, 1:].exp(), sizes.flatten(1))


@torch.no_grad()
def test_sizes_of_several_stages_compose():
    model = tiny_deit()
    spatialmerge.patch(model, "cubist", stages=[[1, 1, 1], [2, 2, 2]], prop_attn=True)
    run = patch_state(model).run(model)
    grid = torch.randn(2, 6, 6, 64, generator=torch.Generator().manual_seed(6))
    first, record1 = cubist_merge(grid, 1, 1)
    _, record2 = cubist_merge(first, 2, 2)
    merged = run.before_block(2, run.before_block(1, grid, model.blocks[1]), model.blocks[2])
    assert merged.shape == (2, 3, 3, 64)
    composed = record2.index.gather(1, record1.index)  # each original cell -> its final token
    expected = torch.stack([torch.bincount(row, minlength=9) for row in composed]).float()
    assert torch.equal(run.cell_sizes().flatten(1), expected)
    assert expected.max() > 2  # some cell really absorbed cells of both stages


@torch.no_grad()
def test_per_layer_tome_uses_proportional_attention_by_default_and_can_turn_it_off():
    model = tiny_deit()
    x = torch.randn(2, 3, 96, 96)
    spatialmerge.patch(model, "tome", r=4)
    assert patch_state(model).config.prop_attn is True
    default = model.forward_features(x)
    spatialmerge.patch(model, "tome", r=4, prop_attn=True)
    assert torch.equal(model.forward_features(x), default)
    spatialmerge.patch(model, "tome", r=4, prop_attn=False)
    assert (model.forward_features(x) - default).abs().max() > 1e-4


# ---------------------------------------------------------------- requests and records


def test_prop_attn_defaults_to_each_methods_authors_and_is_recorded():
    model = tiny_deit()
    assert spatialmerge.describe_schedule(model, "cubist", loc=1, ratio=0.2)["prop_attn"] is False
    assert spatialmerge.describe_schedule(model, "cubist", loc=1, ratio=0.2, prop_attn=True)["prop_attn"] is True
    assert spatialmerge.describe_schedule(model, "tome", r=2)["prop_attn"] is True
    with pytest.raises(ValueError, match="prop_attn='yes' must be true, false or null"):
        spatialmerge.patch(model, "cubist", loc=1, ratio=0.2, prop_attn="yes")


def test_flash_attention_is_refused_naming_the_fix():
    model = tiny("Dinov2Model")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=1, prop_attn=True)
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=1)  # without the bias, flash is fine


def test_reports_run_names_and_searches_say_whether_prop_attn_ran():
    from spatialmerge.reporting.summary import format_summary
    from spatialmerge.adapters.schedule import method_label
    from spatialmerge.search import variant_text

    assert method_label({"method": "cubist", "prop_attn": False}) == "cubist"  # the paper's
    assert method_label({"method": "cubist", "prop_attn": True}) == "cubist (prop_attn)"
    assert method_label({"method": "expedite", "temperature": "auto", "prop_attn": True}) == "expedite (t=auto, prop_attn)"
    assert method_label({"method": "tome", "r": 8, "prop_attn": True}) == "tome (per layer)"  # ToMe's own
    assert method_label({"method": "tome", "r": 8, "prop_attn": False}) == "tome (per layer, no prop_attn)"
    assert variant_text({"method": "pool", "prop_attn": True}) == "prop_attn"
    payload = {"model": "deit_t", "merge": {"method": "cubist", "loc": 1, "ratio": 0.2, "prop_attn": True},
               "metrics": {}, "schedule": None}
    assert format_summary(payload).startswith("model: deit_t   merge: cubist (prop_attn) loc=1 ratio=0.2")
