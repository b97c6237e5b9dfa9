"""The README's offline fine-tune, run as a newcomer types it: the toy dataset command, then the
train.py command, read from the README's "A first hour" block (not copied here), in a fresh
working directory with the project root moved there (SPATIALMERGE_ROOT), so nothing is written
into the checkout."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def first_hour_commands() -> list[list[str]]:
    section = ROOT.joinpath("README.md").read_text().split("## A first hour, offline", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_fine_tune_runs_offline_on_the_folder_it_makes(tmp_path):
    commands = first_hour_commands()
    toy = next(c for c in commands if "spatialmerge.data.toy" in c)
    train = next(c for c in commands if "train.py" in c)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "SPATIALMERGE_ROOT": str(tmp_path),
           "PYTHONPATH": str(ROOT), "SPATIALMERGE_DEVICE": "cpu"}
    for command in (toy, train):
        argv = [sys.executable, *command[1:]]
        if command[1] == "train.py":
            argv[1] = str(ROOT / "train.py")
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr[-3000:]}"
    (record,) = tmp_path.glob("logs/train/runs/*/results.json")
    payload = json.loads(record.read_text())
    assert payload["status"] == "ok"
    assert payload["metrics"]["train"]["steps"] == 10, "trainer=smoke: 10 steps of 8 images"
    assert payload["schedule"]["stages"], "the fine-tune ran with merging"
    assert 0.0 <= payload["metrics"]["top1"]["top1"] <= 100.0 and "delta_top1" in payload["metrics"]["top1"]
