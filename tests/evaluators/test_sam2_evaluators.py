"""SAM 2 through the COCO mIoU, fidelity and throughput paths, and `eval.py model=sam2_b+` end to
end on a synthetic COCO with a checkpoint written here (random weights, reduced Hiera)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import spatialmerge
from spatialmerge.data import CocoInstances
from spatialmerge.evaluators import FidelityEvaluator, MIoUEvaluator
from spatialmerge.evaluators.prompting import PromptPredictor
from spatialmerge.pipeline import EvalContext
from tests.evaluators.conftest import TINY_TRUNK, build_tiny_sam2, miou_by_hand

ROOT = Path(__file__).resolve().parents[2]
MERGE = {"method": "cubist", "loc": 3, "ratio": 0.125, "align": "window"}


@pytest.fixture(scope="module")
def tiny_sam2():
    return build_tiny_sam2()


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_miou_runs_on_sam2_with_one_mask_per_instance_at_image_size(coco_root, tiny_sam2, prompt):
    dataset = CocoInstances(str(coco_root), prompt=prompt)
    item = dataset[1]
    evaluator = MIoUEvaluator(prompt=prompt, num_workers=0, progress=False)
    masks = evaluator.predict_masks(PromptPredictor(tiny_sam2), item["image"], item["prompts"])
    assert masks.shape == (2, 40, 56) and masks.dtype == torch.bool
    result = evaluator.evaluate(tiny_sam2, dataset)
    assert (result["instances"], result["images"]) == (4, 2)
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    expected = miou_by_hand(SAM2ImagePredictor(tiny_sam2), dataset, prompt)
    assert (result["miou"], result["miou_per_image"]) == pytest.approx(expected, abs=1e-4)


def test_a_single_prompt_keeps_its_prompt_axis(coco_root, tiny_sam2):
    predictor = PromptPredictor(tiny_sam2)
    predictor.set_image(CocoInstances(str(coco_root))[0]["image"])
    assert predictor.masks(boxes=np.array([[8.0, 6.0, 24.0, 22.0]])).shape == (1, 48, 64)


def test_the_merged_sam2_miou_comes_beside_the_unmerged_one(coco_root, tiny_sam2):
    factory = partial(CocoInstances, str(coco_root))
    evaluator = MIoUEvaluator(num_workers=0, progress=False)
    both = evaluator.run(EvalContext(tiny_sam2, merge=MERGE, device="cpu", dataset_factory=factory))
    alone = evaluator.run(EvalContext(tiny_sam2, merge=None, device="cpu", dataset_factory=factory))
    assert both["unmerged_miou"] == pytest.approx(alone["miou"])
    assert both["delta_miou"] == pytest.approx(both["miou"] - alone["miou"])
    assert spatialmerge.patch_state(tiny_sam2) is None, "the caller's model is left unpatched"


def test_fidelity_compares_sam2_masks_and_embeddings(coco_root, tiny_sam2):
    images = [item["image"] for item in CocoInstances(str(coco_root))]
    evaluator = FidelityEvaluator(points_per_side=2, num_workers=0, progress=False)
    same = evaluator.evaluate(tiny_sam2, None, images)
    assert same["kind"] == "sam" and same["mask_iou"] == 100.0 and same["embedding_cosine"] == pytest.approx(1.0)
    merged = evaluator.evaluate(tiny_sam2, MERGE, images)
    assert merged["embedding_cosine"] < 1.0 - 1e-6, "the merge changed the embedding"


@pytest.mark.slow
def test_eval_py_runs_sam2_coco_miou_with_merging_from_a_checkpoint(coco_root, tiny_sam2, tmp_path):
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": tiny_sam2.state_dict()}, checkpoint)
    trunk = [f"+model.trunk.{key}={json.dumps(value).replace(' ', '')}" for key, value in TINY_TRUNK.items()]
    done = subprocess.run(
        [sys.executable, "eval.py", "model=sam2_t", f"model.checkpoint={checkpoint}", *trunk,
         f"dataset.root={coco_root}", "merge.loc=3", "merge.align=window", "evaluator.miou.num_workers=0",
         "evaluator.throughput.iters=1", "evaluator.throughput.warmup=0", f"paths.root_dir={tmp_path}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "logs").glob("**/results.json")
    payload = json.loads(results.read_text())
    assert payload["status"] == "ok"
    assert payload["schedule"]["stages"] == [
        {"loc": 3, "r_h": 8, "r_w": 8, "grid_in": [64, 64], "grid_out": [56, 56]}
    ]
    miou = payload["metrics"]["miou"]
    assert miou["instances"] == 4 and "unmerged_miou" in miou
    assert payload["metrics"]["throughput"]["cubist"]["tokens"] == 3136
    assert "ran: before block 3 64x64 -> 56x56" in done.stdout


def test_non_finite_sam2_mask_logits_are_refused(coco_root, tiny_sam2):
    with torch.no_grad():
        for parameter in tiny_sam2.sam_mask_decoder.output_upscaling.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the mask decoder's logits are not finite .* on 2 of 2 prompts of an image"):
        MIoUEvaluator(num_workers=0, progress=False).evaluate(tiny_sam2, CocoInstances(str(coco_root)))
