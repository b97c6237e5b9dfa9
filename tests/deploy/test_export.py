"""Merged encoders deploy: ONNX through onnxruntime, torch.export and torch.compile reproduce
the eager merged model on tiny random models of every family."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spatialmerge
from spatialmerge import export as deploy
from spatialmerge.evaluators.throughput import ThroughputEvaluator, count_graph_breaks
from spatialmerge.reporting.summary import format_summary

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters"))
from test_hiera import STAGE3, sam2  # noqa: E402,F401  (the tiny SAM 2 fixture)
from test_prop_attn import FAMILY_NAMES, _families  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ONNX_FAMILIES = [f for f in FAMILY_NAMES if f != "timm samvit"]  # refused, see below
FAST = {"timm vit", "segment-anything"}  # the rest run with the slow tests


def _merged(family, method, sam2, **options):
    model, x, _ = _families(sam2)[family]
    loc = STAGE3 if family == "hiera" else 1
    extra = {"k": 1} if method == "expedite" else {}  # the tiny grids have few centroids
    spatialmerge.patch(model, method, loc=loc, ratio=0.25, **extra, **options)
    return model, x[:1]


CASES = [pytest.param(family, prop_attn, marks=() if family in FAST and not prop_attn else pytest.mark.slow)
         for family in ONNX_FAMILIES for prop_attn in (False, True)]


@pytest.mark.parametrize(("family", "prop_attn"), CASES)
def test_onnxruntime_runs_the_merged_encoder_as_eager_does(family, prop_attn, sam2, tmp_path):
    model, x = _merged(family, "cubist", sam2, prop_attn=prop_attn)
    expected = deploy.eager_outputs(model, x)
    unmerged = spatialmerge.unpatch(model)
    unmerged_out = deploy.eager_outputs(unmerged, x)
    model, x = _merged(family, "cubist", sam2, prop_attn=prop_attn)
    path = deploy.export(model, x, tmp_path / "encoder.onnx")
    got = deploy.outputs(deploy.OnnxRunner(path), x)
    exported = deploy.max_difference(expected, got)
    assert exported < 1e-4
    # the file holds the merge: fewer tokens than the unmerged encoder's, or (recovered to the
    # full grid) far closer to the eager merged model than to the unmerged one
    if [t.shape for t in unmerged_out] == [t.shape for t in got]:
        assert deploy.max_difference(unmerged_out, got) > 10 * exported
    else:
        assert sum(t.numel() for t in got) < sum(t.numel() for t in unmerged_out)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tome", "expedite", "pool", "oracle"])
@pytest.mark.parametrize("family", ["timm vit", "segment-anything"])
def test_every_grid_method_exports_to_onnx(family, method, sam2, tmp_path):
    model, x = _merged(family, method, sam2)
    expected = deploy.eager_outputs(model, x)
    got = deploy.outputs(deploy.OnnxRunner(deploy.export(model, x, tmp_path / "encoder.onnx")), x)
    assert deploy.max_difference(expected, got) < 1e-4


EXPORT_FAST = {"timm vit", "timm samvit", "segment-anything"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in EXPORT_FAST else pytest.mark.slow)
                                    for f in FAMILY_NAMES])
def test_a_torch_export_program_is_the_eager_merged_model(family, sam2, tmp_path):
    model, x = _merged(family, "cubist", sam2)
    path = deploy.export(model, x, tmp_path / "encoder.pt2", "export")
    got = deploy.outputs(deploy.load_program(path), x)
    assert deploy.max_difference(deploy.eager_outputs(model, x), got) < 1e-5


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f == "timm vit" else pytest.mark.slow)
                                    for f in FAMILY_NAMES])
def test_torch_compile_traces_the_merged_forward_in_one_graph(family, sam2):
    model, x = _merged(family, "cubist", sam2)
    encoder = deploy.Exported(deploy.export_target(model)).eval()
    assert count_graph_breaks(encoder, x) == 0
    compiled = torch.compile(encoder, fullgraph=True, backend="eager")
    got = deploy.outputs(compiled, x)
    assert deploy.max_difference(deploy.eager_outputs(model, x), got) < 1e-5


def test_graph_breaks_are_counted():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum().item() > 0:  # a value read back to Python: TorchDynamo must break here
                return x * 2
            return x - 1

    assert count_graph_breaks(Branchy(), torch.ones(1, 3, 4, 4)) >= 1
    assert count_graph_breaks(torch.nn.Linear(4, 4), torch.ones(1, 3, 4, 4)) == 0


@pytest.mark.slow
def test_compiled_throughput_times_compiled_merged_against_compiled_unmerged():
    from tests.evaluators.conftest import build_tiny_deit

    evaluator = ThroughputEvaluator(iters=1, warmup=1, compile=True, progress=False)
    rows = evaluator.evaluate(build_tiny_deit(), {"cubist": {"method": "cubist", "loc": 0, "r_h": 1, "r_w": 1}})
    assert rows["setup"]["compile"] is True
    assert rows["baseline"]["graph_breaks"] == 0 and rows["cubist"]["graph_breaks"] == 0
    assert rows["cubist"]["tokens"] < rows["baseline"]["tokens"]
    text = format_summary({"model": "deit", "merge": None, "metrics": {"throughput": rows}})
    assert "torch.compile" in text and "graph breaks" in text and "warning: graph breaks" not in text
    rows["cubist"]["graph_breaks"] = 2
    assert "warning: graph breaks in cubist" in format_summary({"model": "deit", "merge": None, "metrics": {"throughput": rows}})


def test_what_the_onnx_exporter_cannot_convert_is_refused_before_tracing(sam2, tmp_path):
    model, x = _merged("timm samvit", "cubist", sam2)
    with pytest.raises(ValueError, match="samvit calls scaled_dot_product_attention on 3D tensors"):
        deploy.export(model, x, tmp_path / "encoder.onnx")
    with pytest.raises(ValueError, match="format='tflite' is not supported"):
        deploy.check_exportable(model, "tflite")
    assert not (tmp_path / "encoder.onnx").exists()


@pytest.mark.slow
def test_export_script_writes_checks_and_times_a_tiny_deit(tmp_path):
    out = tmp_path / "deit.onnx"
    done = subprocess.run(
        [sys.executable, "scripts/export.py", "model=deit_t", "model.checkpoint=null", "+model.image_size=64",
         "+model.depth=2", "merge.loc=1", "merge.ratio=0.25", "--out", str(out), "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merge: cubist loc=1 ratio=0.25" in done.stdout
    assert f"wrote {out}: max |exported - eager| = " in done.stdout
    assert "timed alternately on CPU, batch 1, 2 rounds" in done.stdout
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert "speed-up" in lines["onnxruntime"] and "speed-up" in lines["eager"]
    assert out.exists() and (tmp_path / "deit_unmerged.onnx").exists()
    again = subprocess.run([sys.executable, "scripts/export.py", "model=deit_t", "model.checkpoint=null",
                            "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "never overwrites" in again.stderr


def test_an_existing_unmerged_twin_is_refused_before_any_export(tmp_path):
    twin = tmp_path / "deit_unmerged.onnx"  # an earlier export's timing partner
    twin.write_bytes(b"an earlier export")
    done = subprocess.run([sys.executable, "scripts/export.py", "model=deit_t", "model.checkpoint=null",
                           "--out", str(tmp_path / "deit.onnx")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"{twin} exists; an export never overwrites a file" in done.stderr
    assert twin.read_bytes() == b"an earlier export" and not (tmp_path / "deit.onnx").exists()


@torch.no_grad()
def test_sam_predictor_on_the_onnxruntime_encoder_gives_the_merged_models_masks(tmp_path):
    import numpy as np
    from segment_anything import SamPredictor

    from tests.evaluators.conftest import build_tiny_sam

    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    sam = spatialmerge.patch(build_tiny_sam(), "cubist", loc=1, r_h=2, r_w=2)
    reference = SamPredictor(sam)
    reference.set_image(image)
    expected = [reference.predict(box=np.array(box), multimask_output=False)[0]
                for box in ([2, 2, 30, 40], [20, 5, 60, 45])]
    path = deploy.export(sam, torch.randn(1, 3, 128, 128), tmp_path / "encoder.onnx")
    sam.image_encoder = deploy.OnnxImageEncoder(path, 128)
    deployed = SamPredictor(sam)
    deployed.set_image(image)
    assert (deployed.features - reference.features).abs().max() < 1e-4
    for box, mask in zip(([2, 2, 30, 40], [20, 5, 60, 45]), expected):
        assert np.array_equal(deployed.predict(box=np.array(box), multimask_output=False)[0], mask)
    assert not np.array_equal(expected[0], expected[1]), "the prompts must change the masks"
