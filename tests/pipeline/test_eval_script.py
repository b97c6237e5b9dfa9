"""eval.py as a user runs it: subprocesses, real configs, tiny models."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess runs / real weights: outside the fast tier

ROOT = Path(__file__).resolve().parents[2]
TINY_SAM = [
    "model=sam_b_random",
    "+model.image_size=128",
    "+model.depth=2",
    "+model.embed_dim=32",
    "+model.num_heads=2",
    "+model.global_attn_indexes=[1]",
    "+model.window_size=4",
    "merge.loc=1",
    "evaluator.throughput.iters=1",
    "evaluator.throughput.warmup=0",
]


def run_eval(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **env}
    return subprocess.run(
        # Hydra's flags (-m) must come before the overrides.
        [sys.executable, "eval.py", *[a for a in args if a == "-m"], f"paths.root_dir={tmp_path}"]
        + [a for a in args if a != "-m"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )


def results_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("logs/eval/**/results.json"))


def test_default_run_prints_a_table_and_writes_results(tmp_path):
    done = run_eval(TINY_SAM, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "speed-up" in done.stdout and "cubist" in done.stdout and "baseline" in done.stdout
    assert "accuracy needs a checkpoint" in done.stdout
    (path,) = results_files(tmp_path)
    payload = json.loads(path.read_text())
    assert payload["status"] == "ok" and payload["model"] == "sam_b"
    rows = payload["metrics"]["throughput"]
    assert rows["baseline"]["tokens"] == 64 and rows["cubist"]["tokens"] == 49  # 8x8 -> 7x7
    assert rows["cubist"]["flop_speedup"] > 1.0
    assert payload["config"]["merge"]["method"] == "cubist"
    assert payload["environment"]["torch"] and payload["merge"]["loc"] == 1
    assert (path.parent / "metrics.jsonl").exists(), "the default jsonl logger writes beside it"


def test_bare_run_measures_the_trained_dinov2_on_real_photos(tmp_path):
    # the default command, made quick: two photos at 224 px, one timed round
    done = run_eval(
        ["dataset.names=[astronaut,coffee]", "model.image_size=224", "merge.loc=2", "merge.ratio=0.1",
         "evaluator.throughput.iters=1", "evaluator.throughput.warmup=0"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model: dinov2_s" in done.stdout and "feature_cosine=" in done.stdout
    assert "random weights" not in done.stdout
    (path,) = results_files(tmp_path)
    payload = json.loads(path.read_text())
    fidelity = payload["metrics"]["fidelity"]
    assert fidelity["images"] == 2 and fidelity["kind"] == "features"
    # trained weights merge gently at 10% before block 2; random ones would not get near this
    assert fidelity["feature_cosine"] > 0.98 and fidelity["cls_cosine"] > 0.98
    rows = payload["metrics"]["throughput"]
    assert rows["baseline"]["tokens"] == 16 * 16 and rows["cubist"]["tokens"] == 14 * 14


def test_multirun_writes_one_results_file_per_job(tmp_path):
    done = run_eval(["-m", "merge=cubist,tome", *TINY_SAM, "logger=jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    payloads = [json.loads(p.read_text()) for p in results_files(tmp_path)]
    assert sorted(p["config"]["merge"]["method"] for p in payloads) == ["cubist", "tome"]
    assert all(p["status"] == "ok" for p in payloads)
    # the jobs share one logger group named after what the sweep varies, not a bare timestamp
    starts = [json.loads(p.with_name("metrics.jsonl").read_text().splitlines()[0]) for p in results_files(tmp_path)]
    (group,) = {start["group"] for start in starts}
    assert re.fullmatch(r"eval: merge \(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\)", group), group
    # the same sweep again into its directory: refused, naming the setting that chose it
    sweep_dir = results_files(tmp_path)[0].parent.parent
    before = {path: path.read_bytes() for path in sweep_dir.rglob("*") if path.is_file()}
    again = run_eval(["-m", "merge=cubist,tome", *TINY_SAM, "logger=jsonl", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert again.returncode == 1 and "already records another run" in again.stderr
    assert "leave hydra.sweep.dir unset for a fresh timestamped one" in again.stderr
    assert {path: path.read_bytes() for path in sweep_dir.rglob("*") if path.is_file()} == before


def test_missing_checkpoint_is_one_clear_message_and_nonzero_exit(tmp_path):
    done = run_eval(["model=sam_b"], tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    message = done.stderr
    assert str(tmp_path / "checkpoints" / "sam_vit_b_01ec64.pth") in message
    assert "model.checkpoint=" in message and "sam_vit_b_01ec64.pth" in message
    (path,) = results_files(tmp_path)
    assert json.loads(path.read_text())["status"] == "failed"


def test_accuracy_on_random_weights_is_refused(tmp_path):
    done = run_eval(["evaluator=segmentation", *TINY_SAM[:-2]], tmp_path)
    assert done.returncode == 1
    assert "needs trained weights" in done.stderr and "model.checkpoint=" in done.stderr


@pytest.mark.parametrize("mode", ["offline"])
def test_wandb_offline_writes_a_run_directory(tmp_path, mode):
    done = run_eval(["logger=wandb", *TINY_SAM], tmp_path, WANDB_MODE=mode)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = results_files(tmp_path)
    runs = list(path.parent.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_results_record_the_resolved_schedule_and_the_timing_spread(tmp_path):
    done = run_eval(TINY_SAM, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ran: before block 1 8x8 -> 7x7 (r_h=1, r_w=1)" in done.stdout
    assert "(IQR over rounds)" in done.stdout
    (path,) = results_files(tmp_path)
    payload = json.loads(path.read_text())
    assert payload["schedule"]["stages"] == [
        {"loc": 1, "r_h": 1, "r_w": 1, "grid_in": [8, 8], "grid_out": [7, 7]}
    ]
    assert payload["schedule"]["tokens_out"] == 49
    row = payload["metrics"]["throughput"]["cubist"]
    assert len(row["times_ms"]) == 1 and row["speedup_q1"] <= row["speedup"] <= row["speedup_q3"]


def test_the_run_is_named_after_what_ran_once_loc_null_is_resolved(tmp_path):
    args = [a for a in TINY_SAM if a != "merge.loc=1"] + ["merge.loc=null", "logger=jsonl"]
    done = run_eval(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = results_files(tmp_path)
    events = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    names = {e["event"]: e["name"] for e in events if "name" in e}
    # the request names the run until the model is built; then what ran (2 blocks: loc 0)
    assert names == {"start": "sam_b cubist loc=auto ratio=0.125", "rename": "sam_b cubist loc=0 ratio=0.125"}
    assert json.loads(path.read_text())["merge"]["loc"] == 0


def test_a_finished_run_directory_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"status": "ok", "metrics": {"train": {"loss": 1.0}}}')
    before = (run_dir / "results.json").read_text()
    done = run_eval([*TINY_SAM, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 1
    assert "already records another run" in done.stderr and "Traceback" not in done.stderr
    assert (run_dir / "results.json").read_text() == before
    assert not (run_dir / ".hydra").exists(), "Hydra wrote its config into the finished run"
    # the resume a training run takes does not open an evaluation's record either
    resumed = run_eval([*TINY_SAM, f"hydra.run.dir={run_dir}", "+trainer.resume=auto"], tmp_path)
    assert resumed.returncode == 1 and "already records another run" in resumed.stderr
    assert (run_dir / "results.json").read_text() == before and not (run_dir / ".hydra").exists()


def test_a_run_directory_another_process_is_writing_is_refused(tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / ".running").write_text(str(os.getpid()))  # a live process holds it
    done = run_eval([*TINY_SAM, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 1 and "is being written by another process" in done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".running"], "nothing was written beside it"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".running").write_text(gone.stdout.strip())  # left by a process that has exited
    done = run_eval([*TINY_SAM, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
    assert not (run_dir / ".running").exists(), "the lock is released when the run is done"


def test_a_multirun_with_a_failed_job_says_so_and_exits_nonzero(tmp_path):
    # ratio 0.02 rounds to nothing on the tiny 8x8 grid: that job fails, the other runs
    done = run_eval(["-m", "merge.ratio=0.125,0.02", *TINY_SAM], tmp_path)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "1 ok, 1 failed: run scripts/report.py" in done.stdout
    statuses = sorted(json.loads(p.read_text())["status"] for p in results_files(tmp_path))
    assert statuses == ["failed", "ok"]


def test_a_multirun_job_that_raises_a_bug_is_recorded_and_the_sweep_still_ends_with_its_summary(tmp_path):
    # 1 / 0 as an evaluator: a ZeroDivisionError, no user mistake the jobs know
    done = run_eval(["-m", "merge.ratio=0.125,0.25", "+evaluator.broken._target_=operator.truediv",
                     "+evaluator.broken._args_=[1,0]", *TINY_SAM], tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr, "a bug keeps its traceback"
    assert "0 ok, 2 failed: run scripts/report.py" in done.stdout, "both jobs ran and the summary came"
    records = [json.loads(p.read_text()) for p in results_files(tmp_path)]
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("ZeroDivisionError" in r["error"] for r in records)


def test_the_project_root_anchors_paths_from_any_working_directory(tmp_path):
    from hydra import compose, initialize_config_dir

    import spatialmerge

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval")
    assert spatialmerge.project_root() == str(ROOT)
    if "SPATIALMERGE_ROOT" not in os.environ:
        assert cfg.paths.checkpoint_dir == f"{ROOT}/checkpoints"


def test_ctrl_c_is_recorded_as_interrupted_with_one_line(tmp_path):
    import signal
    import time

    args = [a for a in TINY_SAM if not a.startswith("evaluator.throughput.iters")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, "eval.py", f"paths.root_dir={tmp_path}", *args, "evaluator.throughput.iters=100000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("logs/eval/runs/*/.hydra")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # into the timing loop
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted: interrupted by the user" in stderr
    (path,) = results_files(tmp_path)
    payload = json.loads(path.read_text())
    assert payload["status"] == "interrupted" and payload["error"] == "interrupted by the user (Ctrl-C)"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_before_building_anything(tmp_path):
    done = run_eval([*TINY_SAM, "device=cuda"], tmp_path)
    assert done.returncode == 1
    assert "device='cuda' but CUDA is not available here; use device=cpu" in done.stderr
    assert "Traceback" not in done.stderr
