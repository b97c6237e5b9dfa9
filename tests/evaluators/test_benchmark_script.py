"""scripts/benchmark.py runs end to end on tiny models and writes its JSON."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess runs / real weights: outside the fast tier

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_script_writes_every_column(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--tiny", "--iters", "1", "--warmup", "0", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    # tiny architectures are labelled as such, never as the real model
    assert {row["suite"] for row in payload["rows"]} == {"sam_b (tiny)", "sam2_b+ (tiny)", "deit_b (tiny)",
                                                         "dinov3_b (tiny)"}
    rows = {(row["suite"].removesuffix(" (tiny)"), row["variant"]): row for row in payload["rows"]}
    for row in payload["rows"]:  # every speed-up with its interval and noise verdict
        assert row["speedup_q1"] <= row["speedup"] <= row["speedup_q3"] and isinstance(row["noisy"], bool)
    # SAM 2: merged in Hiera's stage 3, 64x64 -> 56x56 at its 1024 px, tokens of that stage
    sam2 = rows[("sam2_b+", "cubist 56")]
    assert sam2["tokens"] == 3136 and rows[("sam2_b+", "baseline")]["tokens"] == 4096
    assert sam2["oracle_speedup"] == rows[("sam2_b+", "oracle 56")]["speedup"]
    assert 0 < sam2["merge_share"] < 1
    cubist = rows[("sam_b", "cubist 56@1")]
    oracle = rows[("sam_b", "oracle 56@1")]
    assert cubist["tokens"] == oracle["tokens"] == 196  # 16x16 -> 14x14 at ratio 0.125
    assert cubist["oracle_speedup"] == oracle["speedup"]
    assert abs(cubist["efficiency"] - cubist["speedup"] / oracle["speedup"]) < 1e-9
    assert 0 < cubist["merge_share"] < 1
    assert rows[("sam_b", "tome 42@1")]["tokens"] == 100, "single-layer ToMe repeats matching past N/2"
    # Expedit-SAM's per-window clustering: 2x2 windows of 8, each to 5x5 for the 10x10 budget
    assert rows[("sam_b", "expedite 42@1")]["tokens"] == 100
    assert 0 < rows[("sam_b", "expedite 42@1")]["merge_share"] < 1
    assert rows[("deit_b", "tome r=2")]["merge_share"] is None
    assert "| sam_b (tiny) | cubist 56@1 |" in done.stdout and "| speed-up (IQR) | noisy |" in done.stdout
    # the recorded command replays: the same flags, parsed by the script itself
    command = shlex.split(payload["setup"]["command"])
    assert command[:2] == ["python", "scripts/benchmark.py"] and "True" not in command
    assert "--tiny" in command and command[command.index("--out") + 1] == str(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--iters", "0"], "--iters 0 must be >= 1"),
        (["--dtype", "fp16"], "--dtype fp16 is CUDA autocast; on cpu use --dtype fp32"),
        (["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_are_one_line_before_any_timing(args, message):
    done = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--tiny", *args],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and "benchmarking" not in done.stdout


def test_an_existing_output_file_is_never_overwritten(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text('{"rows": "an earlier benchmark"}')
    done = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--tiny", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "never overwrites a file" in done.stderr and "benchmarking" not in done.stdout
    assert out.read_text() == '{"rows": "an earlier benchmark"}'
