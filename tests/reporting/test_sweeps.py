"""The sweep files compose job by job, and a sweep runs end to end into a report."""

import itertools
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

import spatialmerge
from spatialmerge.models import model_info
from spatialmerge.adapters.config import merge_options
from spatialmerge.reporting import build_rows, collect_results

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SWEEPS = sorted(p.stem for p in (CONFIGS / "sweep").glob("*.yaml"))
TINY_SAM = [
    "++model.image_size=128",  # ++: the default model (dinov2_s) has the key, sam_b_random not
    "+model.depth=2",
    "+model.embed_dim=32",
    "+model.num_heads=2",
    "+model.global_attn_indexes=[1]",
    "+model.window_size=4",
    "evaluator.throughput.iters=1",
    "evaluator.throughput.warmup=0",
]


def compose_eval(overrides, hydra_config=False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides), return_hydra_config=hydra_config)


def jobs(params) -> list[list[str]]:
    """The override lists Hydra's basic sweeper launches for ``params``, one per job."""
    axes = []
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        key = override.get_key_element()
        if override.is_sweep_override():
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(combination) for combination in itertools.product(*axes)]


@lru_cache
def meta_model(model_cfg_json: str) -> torch.nn.Module:
    """The full-size architecture without memory or weights; sam2's Hiera calls .item() while
    building, which meta tensors cannot do, so SAM 2 is built for real (random weights)."""
    cfg = json.loads(model_cfg_json)
    on_meta = model_info(cfg["name"]).family != "sam2"
    with torch.device("meta" if on_meta else "cpu"):
        return instantiate(cfg, checkpoint=None)


def test_the_promised_sweeps_exist():
    assert {"sam_schedules", "sam2_schedules", "deit_schedules", "cpu_throughput", "ablation_reduce", "ablation_metric",
            "ablation_positions"} <= set(SWEEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_a_sweep_composes_into_a_valid_merge(name):
    text = (CONFIGS / "sweep" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n# "), "a header comment says what the sweep does"
    assert f"+sweep={name}" in text, "the header shows how to run it"
    cfg = compose_eval([f"+sweep={name}"], hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    launched = jobs(cfg.hydra.sweeper.params)
    assert 2 <= len(launched) <= 64
    for overrides in launched:
        job = compose_eval([f"+sweep={name}", *overrides])
        model = meta_model(json.dumps(OmegaConf.to_container(job.model, resolve=True), sort_keys=True))
        options = merge_options(job.merge)
        assert options is not None, f"{overrides}: every job merges"
        # Validates the options and checks them against this backbone (loc < depth, metric, ...).
        spatialmerge.patch(model, **options)
        spatialmerge.unpatch(model)


def run_eval(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "eval.py", f"paths.root_dir={tmp_path}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_a_sweep_survives_a_failing_job_and_reports_every_job(tmp_path):
    # cpu_throughput narrowed to 2 jobs on a tiny SAM; ratio 0.6 is out of range, so job 1 fails.
    done = run_eval(["+sweep=cpu_throughput", "merge=cubist", "merge.loc=1", "merge.ratio=0.25,0.6", *TINY_SAM], tmp_path)
    # the other job ran; the sweep still says, in its exit code and last line, that one failed
    assert done.returncode == 1, done.stderr[-2000:]
    assert "1 ok, 1 failed: run scripts/report.py" in done.stdout
    (sweep_dir,) = (tmp_path / "logs" / "eval" / "multiruns").glob("*_cpu_throughput")
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/results.json")}
    assert statuses == {"0": "ok", "1": "failed"}
    assert "ratio=0.6" in json.loads((sweep_dir / "1" / "results.json").read_text())["error"]

    report = subprocess.run([sys.executable, "scripts/report.py", str(sweep_dir), "--wandb", "off"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    rows = build_rows(collect_results(sweep_dir))
    job_rows = [r for r in rows if r["run"] in ("0", "1")]
    assert [(r["method"], r["status"]) for r in job_rows] == [("cubist", "ok"), ("cubist", "failed")]
    assert job_rows[0]["tokens"] == 36 and job_rows[0]["out_grid"] == "6x6"
    assert len(rows) == 3 and rows[0]["method"] == "baseline (in-process)"
    assert (sweep_dir / "report.csv").read_text().count("\n") == 1 + 3
    assert (sweep_dir / "pareto.png").stat().st_size > 0
