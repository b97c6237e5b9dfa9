"""Every command the README and docs/ show is one the tools accept: eval.py and train.py overrides
compose with Hydra (a key that needs ``+``, a value off a group, an option ``merge=none`` would
ignore are caught here, not by a reader), and every flag given to a script is one it defines.

The commands are read from the pages' ```bash blocks, not copied here, so a page that changes is
checked as it is. Placeholders a reader fills in (``...``, ``<time>``, ``/path/to/...``) compose
as plain strings; a sweep override (``merge=cubist,tome``) is checked at each of its values.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from spatialmerge.adapters.config import merge_options

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# scripts that take eval.py's overrides beside their own flags
TAKES_EVAL_OVERRIDES = {"scripts/search.py", "scripts/visualize.py", "scripts/export.py"}
# command-line flags of the entry points that take a value (Hydra's and torchrun's)
VALUE_FLAGS = {"--cfg", "--config-name", "--config-dir", "--nproc_per_node", "--package"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """(page: first words, tokens) for every python command of every ```bash block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                tokens = shlex.split(line, comments=True)
                while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # FOO=bar python ...
                    tokens.pop(0)
                if tokens and tokens[0] in ("python", "torchrun"):
                    found.append((f"{page.name}: {' '.join(tokens[:3])}", tokens))
    return found


COMMANDS = documented_commands()


def split_command(tokens: list[str]) -> tuple[str, list[str], list[str]]:
    """(entry point, flags, key=value overrides) of one command; ``...`` placeholders dropped."""
    script_at = next(i for i, t in enumerate(tokens) if t.endswith(".py") or t == "-m")
    entry = tokens[script_at + 1] if tokens[script_at] == "-m" else tokens[script_at]
    rest = tokens[script_at + (2 if tokens[script_at] == "-m" else 1):]
    flags, overrides, skip = [], [], False
    for token in rest:
        if skip:
            skip = False
        elif token.startswith("-"):
            flags.append(token.split("=", 1)[0])
            skip = token in VALUE_FLAGS or (entry.startswith("scripts/") and "=" not in token and token != "-m")
        elif "=" in token and token != "...":
            overrides.append(token)
    return entry, flags, overrides


def each_value(overrides: list[str]) -> list[list[str]]:
    """The override lists a sweep expands to, one per value of each swept key (not their
    product: each value composes, which is what a reader's mistake would break)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    lists = [fixed]
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            lists.extend([*fixed, f"{key}={value}"] for value in override.sweep_string_iterator())
    return lists


def sweep_file_params(config: str, overrides: list[str]) -> list[str]:
    """The overrides a ``+sweep=NAME`` file's ``hydra.sweeper.params`` add, as Hydra's sweeper
    adds them: before the command line's, which win."""
    sweeps = [o for o in overrides if o.startswith("+sweep=")]
    if not sweeps:
        return []
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        params = compose(config_name=config, overrides=sweeps, return_hydra_config=True).hydra.sweeper.get("params")
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [f"{key}={value}" for key, value in (params or {}).items() if key not in given]


@cache
def help_text(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def placeholders_filled(override: str) -> str:
    """``<time>`` and friends, which Hydra's grammar does not take, as a reader's value would be."""
    return re.sub(r"<[^>]*>", "x", override)


def test_the_pages_hold_commands_of_every_entry_point():
    entries = {split_command(tokens)[0] for _, tokens in COMMANDS}
    assert {"eval.py", "train.py", "scripts/report.py", "scripts/search.py", "scripts/visualize.py",
            "scripts/benchmark.py", "scripts/export.py", "spatialmerge.data.toy"} <= entries


@pytest.mark.parametrize(("where", "tokens"), COMMANDS, ids=[f"{w} #{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_a_documented_command_is_one_the_tool_accepts(where, tokens):
    entry, flags, overrides = split_command(tokens)
    overrides = [placeholders_filled(o) for o in overrides]
    if entry in ("eval.py", "train.py") or entry in TAKES_EVAL_OVERRIDES:
        if any(o.startswith(("hydra.searchpath=", "'hydra.searchpath")) for o in overrides):
            pytest.skip("loads merge configs a search writes at run time")
        if any(o.startswith("hydra/launcher=submitit") for o in overrides):
            pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional SLURM launcher")
        config = "train" if entry == "train.py" else "eval"
        overrides = [*sweep_file_params(config, overrides), *overrides]
        for chosen in each_value(overrides):
            with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                cfg = compose(config_name=config, overrides=chosen)
            merge_options(cfg.merge)  # refuses what merge=none would not use
    if entry.startswith("scripts/") or entry == "spatialmerge.data.toy":
        script = entry if entry.startswith("scripts/") else "spatialmerge/data/toy.py"
        unknown = [f for f in flags if not re.search(rf"(^|[\s,]){re.escape(f)}\b", help_text(script))]
        assert not unknown, f"{where}: {entry} defines no {', '.join(unknown)}"
