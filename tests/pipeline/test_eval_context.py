"""The evaluator protocol: a context hands out the unmerged model and a merged copy side by
side, and never patches a model an evaluator already holds."""

import timm
import torch

import spatialmerge
from spatialmerge.pipeline import EvalContext


def test_merged_and_unmerged_models_coexist_without_patching_in_place():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    ctx = EvalContext(model, {"method": "cubist", "loc": 1, "r_h": 1, "r_w": 1}, "cpu")
    unmerged, merged = ctx.unmerged_model(), ctx.merged_model()
    assert unmerged is model and merged is not model and ctx.merged_model() is merged
    assert spatialmerge.patch_state(unmerged) is None and spatialmerge.patch_state(merged) is not None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert unmerged.forward_features(x).shape[1] == 1 + 16  # asking for the merged copy changed nothing
        assert merged.forward_features(x).shape[1] == 1 + 9


def test_a_model_fine_tuned_with_merging_is_the_unmerged_reference_once_its_patch_is_off():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=1)
    ctx = EvalContext(model, {"method": "cubist", "loc": 1, "r_h": 1, "r_w": 1}, "cpu")
    assert spatialmerge.patch_state(ctx.unmerged_model()) is None
    assert spatialmerge.patch_state(ctx.merged_model()).config.stages[0].loc == 1
    assert EvalContext(model, None, "cpu").merged_model() is model
