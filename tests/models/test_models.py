"""Backbone registry, official-format checkpoint conversion and safe loading.

Full-size models are only built on the meta device (shapes, no memory, no weights); everything
that runs a forward pass uses tiny overrides so the file stays fast on a 2-core CPU.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import pytest
import segment_anything
import torch
from safetensors.torch import save_file
from timm.models import vision_transformer_sam
from torch import Tensor, nn

from spatialmerge.models import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    available_models,
    build_model,
    load_checkpoint,
    model_info,
)

# Window 5 does not divide the 16 x 16 token grid, so window padding is exercised too.
TINY_SAM = dict(
    image_size=256, depth=4, embed_dim=64, num_heads=2, global_attn_indexes=(1, 3),
    window_size=5, prompt_embed_dim=32,
)
# The same encoder in timm's vocabulary (samvit's neck width is SAM's prompt_embed_dim).
TINY_SAMVIT = dict(
    image_size=256, depth=4, embed_dim=64, num_heads=2, global_attn_indexes=(1, 3),
    window_size=5, neck_chans=32,
)
TINY_DEIT = dict(image_size=64, depth=2, embed_dim=48, num_heads=2, num_classes=10)
TINY_DINOV3 = dict(image_size=64, depth=2, embed_dim=64, num_heads=2)
TINY: dict[str, dict[str, object]] = {
    "sam_b": TINY_SAM,
    "samvit_b": TINY_SAMVIT,
    "deit_t": TINY_DEIT,
    "deit_b_distilled": TINY_DEIT,
    "dinov3_s": TINY_DINOV3,
}

ALL_NAMES = [
    "sam_b", "sam_l", "sam_h", "sam2_t", "sam2_s", "sam2_b+", "sam2_l", "samvit_b", "samvit_l", "samvit_h",
    "deit_t", "deit_s", "deit_b", "deit_b_distilled", "dinov2_s", "dinov3_s", "dinov3_b", "dinov3_l",
    "hf_vit_b", "hf_deit_b", "hf_dinov2_s", "hf_dinov2_reg_s", "hf_dinov3_s", "hf_sam_b",
]


def _build_tiny(name: str, seed: int, checkpoint: Path | None = None, **extra: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, checkpoint, **{**TINY[name], **extra})


def _randomize(model: nn.Module, seed: int) -> None:
    # Some parameters start at zero or one (rel-pos tables, biases, norms, layer scale), which
    # would let a loader that skips them pass; give every parameter distinct values.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + p)


def _shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --- registry and metadata ------------------------------------------------------------------


def test_every_name_is_registered_with_complete_info() -> None:
    assert available_models() == ALL_NAMES
    families = {"sam": {"segmentation"}, "sam2": {"segmentation"}, "samvit": {"features"}, "hf": {"features", "segmentation"},
                "vit": {"classification", "features"}, "eva": {"features"}}
    for name in ALL_NAMES:
        info = model_info(name)
        assert info.name == name
        assert info.task in families[info.family]
        assert info.grid_size * info.patch_size == info.input_size
        assert (info.timm_name is None) == (info.family in ("sam", "sam2", "hf"))
        if info.family == "hf":  # a Hub repository, read from its local copy
            assert "/" in info.checkpoint_file and "huggingface-cli download" in info.checkpoint_source
        else:
            suffix = ".pt" if info.family == "sam2" else ".pth"  # as each release names its files
            assert info.checkpoint_file.endswith(suffix) and info.checkpoint_source
        assert info.checkpoint_file in info.where_to_get()
    assert model_info("sam_h").checkpoint_file == "sam_vit_h_4b8939.pth"
    assert model_info("sam2_b+").checkpoint_file == "sam2.1_hiera_base_plus.pt"
    assert "segment_anything_2/092824/" in model_info("sam2_b+").checkpoint_url
    assert "dl.fbaipublicfiles.com" in model_info("sam_h").checkpoint_url
    assert model_info("samvit_h").checkpoint_file == "sam_vit_h_4b8939.pth"
    assert model_info("deit_b").checkpoint_file == "deit_base_patch16_224-b5f2ef4d.pth"
    assert model_info("dinov3_b").checkpoint_file == "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    assert "DINOv3" in model_info("dinov3_b").checkpoint_source
    assert [model_info(n).num_prefix_tokens for n in ("sam_b", "deit_b", "deit_b_distilled",
                                                      "dinov3_s", "dinov2_s")] == [0, 1, 2, 5, 1]
    assert model_info("dinov2_s").task == "features" and model_info("dinov2_s").patch_size == 14


@pytest.mark.parametrize("bad", ["sam_x", "deit", ""])
def test_unknown_name_lists_the_known_names(bad: str) -> None:
    for call in (build_model, model_info):
        with pytest.raises(ValueError, match=f"unknown model {bad!r}") as err:
            call(bad)
        assert all(name in str(err.value) for name in ALL_NAMES)


@pytest.mark.parametrize(
    ("name", "reference", "embed_dim", "depth", "heads", "global_blocks"),
    [
        ("sam_b", segment_anything.build_sam_vit_b, 768, 12, 12, (2, 5, 8, 11)),
        ("sam_l", segment_anything.build_sam_vit_l, 1024, 24, 16, (5, 11, 17, 23)),
        ("sam_h", segment_anything.build_sam_vit_h, 1280, 32, 16, (7, 15, 23, 31)),
    ],
)
def test_sam_matches_segment_anything_builders(
    name: str, reference, embed_dim: int, depth: int, heads: int, global_blocks: tuple[int, ...]
) -> None:
    with torch.device("meta"):
        ours = build_model(name)
        theirs = reference()  # no checkpoint: segment-anything's unsafe torch.load never runs
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
    encoder = ours.image_encoder
    assert encoder.img_size == 1024 and encoder.patch_embed.proj.out_channels == embed_dim
    assert len(encoder.blocks) == depth and encoder.blocks[0].attn.num_heads == heads
    windows = [block.window_size for block in encoder.blocks]
    assert tuple(i for i, w in enumerate(windows) if w == 0) == global_blocks
    assert set(windows) == {0, 14}
    assert ours.prompt_encoder.embed_dim == 256 and not ours.training


@pytest.mark.parametrize(("samvit", "sam"), [("samvit_b", "sam_b"), ("samvit_l", "sam_l"),
                                             ("samvit_h", "sam_h")])
def test_samvit_has_the_layout_of_the_official_sam_encoder(samvit: str, sam: str) -> None:
    with torch.device("meta"):
        encoder = build_model(samvit)
        official = build_model(sam).state_dict()
    converted = vision_transformer_sam.checkpoint_filter_fn(official, encoder)
    assert _shapes(converted) == _shapes(encoder.state_dict())


@pytest.mark.parametrize(
    ("name", "embed_dim", "depth", "heads", "params_m"),
    [
        # Parameter counts as published: timm's model cards for DeiT, the DINOv3 paper (21M,
        # 86M, 300M), rounded, hence the tolerance.
        ("deit_t", 192, 12, 3, 5.7),
        ("deit_s", 384, 12, 6, 22.1),
        ("deit_b", 768, 12, 12, 86.6),
        ("deit_b_distilled", 768, 12, 12, 87.3),
        ("dinov3_s", 384, 12, 6, 21.0),
        ("dinov3_b", 768, 12, 12, 86.0),
        ("dinov3_l", 1024, 24, 16, 300.0),
    ],
)
def test_full_size_timm_models(
    name: str, embed_dim: int, depth: int, heads: int, params_m: float
) -> None:
    with torch.device("meta"):
        model = build_model(name)
    assert model.embed_dim == embed_dim and len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.num_prefix_tokens == model_info(name).num_prefix_tokens
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(params_m, rel=0.03)
    if model_info(name).family == "eva":
        assert type(model.rope).__name__ == "RotaryEmbeddingDinoV3"


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", list(TINY))
def test_round_trip(name: str, suffix: str, tmp_path: Path) -> None:
    source = _build_tiny(name, seed=0)
    _randomize(source, seed=0)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)

    loaded = _build_tiny(name, seed=1, checkpoint=path)
    assert not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_sam_checkpoint_loads_into_samvit_with_the_same_output(tmp_path: Path) -> None:
    sam = _build_tiny("sam_b", seed=0)
    _randomize(sam, seed=0)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(sam.state_dict(), path)  # segment-anything layout: image_encoder.*, mask_decoder.*

    samvit = _build_tiny("samvit_b", seed=1, checkpoint=path)
    # The second image is nearly flat: its tokens have a small variance, where a LayerNorm eps
    # other than SAM's 1e-6 shows (timm's samvit default, 1e-5, is off by ~1e-3 here).
    image = torch.randn(2, 3, 256, 256) * torch.tensor([1.0, 0.01]).view(2, 1, 1, 1)
    with torch.no_grad():
        expected = sam.image_encoder(image)  # (B, 32, 16, 16)
        actual = samvit.forward_features(image)
    assert actual.shape == expected.shape == (2, 32, 16, 16)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _to_official_dinov3(state: dict[str, Tensor], head_dim: int) -> dict[str, Tensor]:
    """timm Eva keys -> the layout of Meta's DINOv3 release (the inverse of timm's converter)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("attn.q_bias") or key.endswith("attn.v_bias"):
            continue
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[key] = value
        if key.endswith("attn.qkv.weight"):
            prefix = key[: -len("weight")]
            dim = value.shape[0] // 3
            q_bias = state.get(prefix.replace("qkv.", "q_bias"), torch.zeros(dim))
            v_bias = state.get(prefix.replace("qkv.", "v_bias"), torch.zeros(dim))
            # DINOv3 stores a k bias but masks it to zero; garbage here must not matter.
            out[prefix + "bias"] = torch.cat([q_bias, torch.randn(dim), v_bias])
            out[prefix + "bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim),
                                                   torch.ones(dim)])
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    out["rope_embed.periods"] = torch.ones(head_dim // 4)
    return out


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_official_dinov3_checkpoint_gives_the_same_output(qkv_bias: bool, tmp_path: Path) -> None:
    source = _build_tiny("dinov3_s", seed=0, qkv_bias=qkv_bias)
    _randomize(source, seed=0)
    official = _to_official_dinov3(source.state_dict(), head_dim=32)
    assert "storage_tokens" in official and "blocks.0.ls1.gamma" in official
    path = tmp_path / "dinov3_tiny.pth"
    torch.save(official, path)

    loaded = _build_tiny("dinov3_s", seed=1, checkpoint=path, qkv_bias=qkv_bias)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(image), source.forward_features(image))


def test_dinov3_refuses_to_drop_a_nonzero_qkv_bias(tmp_path: Path) -> None:
    source = _build_tiny("dinov3_s", seed=0, qkv_bias=True)
    _randomize(source, seed=0)
    path = tmp_path / "dinov3_biased.pth"
    torch.save(_to_official_dinov3(source.state_dict(), head_dim=32), path)
    with pytest.raises(CheckpointMismatchError, match="qkv_bias=True") as err:
        _build_tiny("dinov3_s", seed=1, checkpoint=path, qkv_bias=False)
    assert str(path) in str(err.value)


def test_containers_and_ddp_prefixes_are_unwrapped(tmp_path: Path) -> None:
    source = _build_tiny("deit_t", seed=0)
    ddp = {f"module.{k}": v for k, v in source.state_dict().items()}
    for i, wrapped in enumerate([{"model": ddp}, {"state_dict": source.state_dict()}]):
        path = tmp_path / f"wrapped{i}.pth"
        torch.save(wrapped, path)
        loaded = _build_tiny("deit_t", seed=1, checkpoint=path)
        assert torch.equal(loaded.cls_token, source.cls_token)


# --- errors ----------------------------------------------------------------------------------


def test_missing_file_names_path_config_key_and_official_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "sam.pth"
    with pytest.raises(CheckpointNotFoundError) as err:
        build_model("sam_h", checkpoint=path)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(path) in message
    assert "model.checkpoint=/path/to/sam_vit_h_4b8939.pth" in message
    assert "dl.fbaipublicfiles.com" in message

    with pytest.raises(CheckpointNotFoundError, match="dinov3_vitb16_pretrain_lvd1689m-73cec8be"):
        build_model("dinov3_b", checkpoint=path)
    with pytest.raises(CheckpointNotFoundError, match="model.checkpoint=") as err:
        load_checkpoint(nn.Linear(2, 2), path)
    assert str(path) in str(err.value)


def test_mismatched_keys_and_shapes_are_named(tmp_path: Path) -> None:
    model = _build_tiny("deit_t", seed=0)
    state = dict(model.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.9.extra.weight"] = torch.zeros(3)
    state["head.weight"] = torch.zeros(5, 48)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)

    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(model, path, model_name="deit_t")
    message = str(err.value)
    assert str(path) in message
    assert "blocks.1.mlp.fc2.bias" in message and "blocks.9.extra.weight" in message
    assert "head.weight (model [10, 48], file [5, 48])" in message
    assert "deit_tiny_patch16_224-a1311bcf.pth" in message

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): .*\(\d+ more\)") as err:
        load_checkpoint(model, path)
    assert str(err.value).count("blocks.") == 5  # at most five keys are listed
    with pytest.warns(UserWarning, match="non-strict"):
        load_checkpoint(model, path, strict=False)


class _RunsCommand:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    def payload(marker: Path) -> _RunsCommand:
        return _RunsCommand(f"touch {shlex.quote(str(marker))}")

    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(payload(control)))  # an unsafe loader really runs it
    assert control.exists()

    marker = tmp_path / "marker"
    torch_file, raw_file = tmp_path / "evil.pth", tmp_path / "evil_raw.pt"
    torch.save({"weight": torch.zeros(2, 2), "evil": payload(marker)}, torch_file)
    raw_file.write_bytes(pickle.dumps(payload(marker), protocol=2))
    for path in (torch_file, raw_file):
        with pytest.raises(CheckpointFormatError, match="refused") as err:
            load_checkpoint(nn.Linear(2, 2), path)
        assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("notes.pth", b"this is not a checkpoint\n", "not a PyTorch weights file"),
        ("empty.pt", b"", "not a PyTorch weights file"),
        ("broken.safetensors", b"\x00\x01garbage", "not a valid safetensors file"),
        ("list.pth", None, "not a state dict"),
    ],
)
def test_corrupt_files_are_named(
    name: str, content: bytes | None, why: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    if content is None:
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=why) as err:
        load_checkpoint(nn.Linear(2, 2), path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("sam_b", {"image_size": 100}, r"model.image_size=100 for 'sam_b' is not a multiple of its 16-px patches; "
                                        r"the nearest valid sizes are 96 and 112"),
        ("sam_b", {"image_size": 0}, r"model.image_size=0 for 'sam_b' must be a whole number of pixels"),
        ("sam_b", {"image_size": 127.5}, r"model.image_size=127.5 .* must be a whole number"),
        ("deit_t", {"image_size": 50}, r"nearest valid sizes are 48 and 64"),
        ("deit_t", {"img_size": 64}, r"model.img_size=64 for 'deit_t': every model takes its input side as "
                                      r"model.image_size \(e.g. model.image_size=64\)"),
    ],
)
def test_an_input_size_the_patches_do_not_tile_is_refused_before_building(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **overrides)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (450, r"model.image_size=450 for 'hf_dinov2_s' is not a multiple of its 14-px patches; "
              r"the nearest valid sizes are 448 and 462"),
        (127.5, r"model.image_size=127.5 for 'hf_dinov2_s' must be a whole number of pixels"),
        (True, r"model.image_size=True for 'hf_dinov2_s' must be a whole number of pixels"),
    ],
)
def test_a_transformers_model_refuses_the_sizes_every_other_model_refuses(size, message):
    with pytest.raises(ValueError, match=message):
        build_model("hf_dinov2_s", image_size=size, num_hidden_layers=1)
