"""scripts/check_reference.py refuses a path that is not the reference checkout, in one line."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--tome", "no tome/merge.py there; pass the root of a facebookresearch/ToMe checkout"),
     ("--expedit", "pass the root of an Expedit-SAM checkout")],
)
def test_a_path_without_the_reference_is_one_clear_line(tmp_path, flag, message):
    done = subprocess.run([sys.executable, "scripts/check_reference.py", flag, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
