"""The sweep report's numbers, rows and labels, checked cell by cell on hand-made run records.

Every expected value below is worked out from the record the test builds (timings, token counts,
accuracies), never copied from the report's output. The explanatory prose of report.md is not
checked word for word; its layout (blank lines between blocks, so markdown renders each table
as a table) is.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
from test_report import SAM_CONFIG, SETUP, result, speed, write

from spatialmerge.adapters.schedule import method_label, schedule_text
from spatialmerge.reporting import build_rows, collect_results, markdown_table
from spatialmerge.reporting.table import (
    COLUMN_KEYS,
    IN_PROCESS_BASELINE,
    describe_setup,
    pivot_markdown,
    write_report,
)

# SAM's 64x64 patch grid, as result()'s baseline records it
BASE_TOKENS = 4096


def cells(line: str) -> dict[str, str]:
    """A markdown table row of markdown_table as {column key: cell text}."""
    assert line.startswith("| ") and line.endswith(" |"), line
    parts = line[2:-2].split(" | ")
    assert len(parts) == len(COLUMN_KEYS), line
    return dict(zip(COLUMN_KEYS, parts))


def only_row(rows, method):
    (row,) = [r for r in rows if r["method"] == method]
    return row


def cubist_record(**changes):
    """An ok cubist job at loc=3 with a recorded speed, changed where a test needs it."""
    # a deep copy: result() shares SAM_CONFIG's nested dicts, which tests here change
    record = copy.deepcopy(result("cubist", miou=68.5, merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3))
    record.update(changes)
    return record


# --- collect_results: what a directory yields ---------------------------------------------------


def test_a_path_that_is_not_a_directory_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_sweep"
    with pytest.raises(FileNotFoundError, match="is not a directory") as err:
        collect_results(missing)
    assert str(missing) in str(err.value)


def test_a_single_run_directory_is_labelled_by_its_own_name(tmp_path):
    # eval.py's single runs are passed directly: the label is the run's directory name, not "."
    write(tmp_path, "2025-01-01_12-00-00", cubist_record())
    (found,) = collect_results(tmp_path / "2025-01-01_12-00-00")
    assert found["_run"] == "2025-01-01_12-00-00"


@pytest.mark.parametrize(("content", "why"), [("{not json", "unreadable"), ("[1, 2]", "holds a JSON list")])
def test_an_unreadable_results_file_is_a_failed_entry_with_an_empty_config(tmp_path, content, why):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(content)
    (entry,) = collect_results(tmp_path)
    # the entry has a run record's shape, so everything reading "config" (grouping, W&B) works
    assert entry["status"] == "failed" and entry["config"] == {} and entry["_run"] == "0"
    assert entry["error"].startswith(f"unreadable {tmp_path / '0' / 'results.json'}: ") and why in entry["error"]
    (row,) = build_rows([entry])
    assert row["status"] == "failed" and row["method"] == "none" and row["speedup"] is None


def _killed_job(root: Path, name: str, config_yaml: str) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "config.yaml").write_text(config_yaml)


def test_a_killed_jobs_config_is_resolved_so_it_groups_with_its_siblings(tmp_path):
    # results.json holds the resolved config; the killed job's interpolation must resolve alike
    config = copy.deepcopy(SAM_CONFIG)
    config["evaluator"]["throughput"]["device"] = "cuda"
    write(tmp_path, "0", result("cubist", miou=68.5, merged=speed(12.5, 320.0, 3136, 1.25, 1.25), config=config, loc=3))
    raw = copy.deepcopy(config)
    raw["evaluator"]["throughput"]["device"] = "${device}"
    raw["merge"] = {"method": "cubist", "loc": 6, "ratio": 0.25}
    _killed_job(tmp_path, "1", json.dumps(raw))
    results = collect_results(tmp_path)
    assert results[1]["config"]["evaluator"]["throughput"]["device"] == "cuda"
    rows = build_rows(results)
    killed = next(r for r in rows if r["run"] == "1")
    assert killed["status"] == "no results" and "no results.json" in killed["error"]
    assert killed["group"] == next(r for r in rows if r["run"] == "0")["group"]
    assert sum(r["method"] == IN_PROCESS_BASELINE for r in rows) == 1


def test_a_killed_job_whose_config_cannot_resolve_keeps_it_unresolved(tmp_path, monkeypatch):
    # ${oc.env:...} of a variable only the job's environment had: the row must still appear
    monkeypatch.delenv("SPATIALMERGE_TEST_UNSET_VARIABLE", raising=False)
    raw = {**SAM_CONFIG, "logger": {"dir": "${oc.env:SPATIALMERGE_TEST_UNSET_VARIABLE}"},
           "merge": {"method": "cubist", "loc": 6, "ratio": 0.25}}
    _killed_job(tmp_path, "0", json.dumps(raw))
    (entry,) = collect_results(tmp_path)
    assert entry["status"] == "no results"
    assert entry["config"]["logger"]["dir"] == "${oc.env:SPATIALMERGE_TEST_UNSET_VARIABLE}"
    (row,) = build_rows([entry])
    assert (row["method"], row["schedule"], row["model"]) == ("cubist", "loc=6 ratio=0.25", "sam_b")


# --- labels ---------------------------------------------------------------------------------------


def test_method_labels_name_the_prop_attn_and_softmax_variants():
    # per-layer ToMe has proportional attention by default: only switching it off is named
    assert method_label({"method": "tome", "r": 8}) == "tome (per layer)"
    assert method_label({"method": "tome", "r": 8, "prop_attn": True}) == "tome (per layer)"
    assert method_label({"method": "tome", "r": 8, "prop_attn": False}) == "tome (per layer, no prop_attn)"
    # elsewhere proportional attention is the variant
    assert method_label({"method": "cubist", "loc": 3, "prop_attn": True}) == "cubist (prop_attn)"
    assert method_label({"method": "cubist", "loc": 3, "prop_attn": False}) == "cubist"
    assert method_label({"method": "expedite", "temperature": 0.1, "reconstruct": "softmax"}) == "expedite (t=0.1, softmax)"
    assert method_label({"method": "expedite", "temperature": 0.1, "reconstruct": "linear"}) == "expedite (t=0.1)"
    assert (method_label({"method": "expedite", "temperature": 0.1, "windowed": True, "reconstruct": "softmax",
                          "prop_attn": True}) == "expedite (t=0.1, per window, softmax, prop_attn)")


def test_schedule_text_of_dict_stages_and_of_one_sided_r():
    # stages may be given as dicts (adapters.config accepts them): compact JSON, no spaces
    assert schedule_text({"method": "cubist", "stages": [{"loc": 2, "ratio": 0.2}]}) == 'stages=[{"loc":2,"ratio":0.2}]'
    # one of r_h / r_w is an r_h/r_w request (pipeline.merge_options), not a ratio one
    only_h = schedule_text({"method": "cubist", "loc": 3, "r_h": 2, "r_w": None, "ratio": 0.1})
    only_w = schedule_text({"method": "cubist", "loc": 3, "r_h": None, "r_w": 5, "ratio": 0.1})
    assert only_h.startswith("loc=3 r=2x") and "ratio" not in only_h
    assert only_w.startswith("loc=3 r=") and only_w.endswith("x5") and "ratio" not in only_w
    # a merge that names no method is the unmerged model, as method_label says
    assert schedule_text({"loc": 3, "ratio": 0.1}) == "-" and method_label({"loc": 3, "ratio": 0.1}) == "none"


# --- one row per record ---------------------------------------------------------------------------


def test_a_row_takes_speed_tokens_and_setup_from_its_record():
    (row,) = [r for r in build_rows([cubist_record()]) if r["method"] == "cubist"]
    # speed(12.5, 320.0, 3136, 1.25, 1.25) against the 4096-token, 400-GFLOP baseline
    assert (row["img_s"], row["gflops"], row["tokens"]) == (12.5, 320.0, 3136)
    assert row["kept_pct"] == pytest.approx(100 * 3136 / BASE_TOKENS)
    assert row["setup"] == SETUP
    # in-memory records have no run directory and an ok job no error: blank, not None
    assert row["run"] == "" and row["error"] == "" and row["status"] == "ok"


def test_a_record_without_a_status_is_not_ok():
    record = cubist_record()
    del record["status"]
    assert only_row(build_rows([record]), "cubist")["status"] == "failed"


def test_the_model_is_the_records_own_else_the_configs_name():
    named = cubist_record(model="sam_b_custom")
    unnamed = cubist_record()
    del unnamed["model"]
    assert only_row(build_rows([named]), "cubist")["model"] == "sam_b_custom"
    assert only_row(build_rows([unnamed]), "cubist")["model"] == SAM_CONFIG["model"]["name"]


@pytest.mark.parametrize(("checkpoint", "random"), [(None, True), ("/w/sam.pth", False), ("absent", False)])
def test_random_weights_are_flagged_only_for_a_null_checkpoint(checkpoint, random):
    record = cubist_record()
    if checkpoint == "absent":
        del record["config"]["model"]["checkpoint"]
    else:
        record["config"]["model"]["checkpoint"] = checkpoint
    assert only_row(build_rows([record]), "cubist")["random_weights"] is random


def test_the_resolved_merge_decides_method_schedule_and_speed():
    # the config asked for loc=auto; the job resolved it to loc=6
    record = cubist_record()
    record["config"]["merge"]["loc"] = None
    record["merge"] = {"method": "cubist", "loc": 6, "ratio": 0.125}
    assert only_row(build_rows([record]), "cubist")["schedule"] == "loc=6 ratio=0.125"
    # a record with a resolved merge but no merge config still reads the method's timing
    no_config = cubist_record()
    del no_config["config"]["merge"]
    row = only_row(build_rows([no_config]), "cubist")
    assert row["speedup"] == 1.25 and row["tokens"] == 3136
    # and one without a resolved merge falls back to the config's method
    no_resolved = cubist_record(merge=None)
    row = only_row(build_rows([no_resolved]), "cubist")
    assert row["speedup"] == 1.25 and row["tokens"] == 3136


def test_a_job_without_its_methods_timing_has_blank_speed_cells():
    record = cubist_record()
    del record["metrics"]["throughput"]["cubist"]
    row = only_row(build_rows([record]), "cubist")
    assert row["speedup"] is None and row["tokens"] is None and row["kept_pct"] is None and row["value"] == 68.5


def test_a_stored_noise_verdict_keeps_its_reasons():
    merged = speed(12.5, 320.0, 3136, 1.25, 1.25)
    merged.update(speedup_q1=1.0, speedup_q3=1.6, noisy=True, noise=["the speed-up's IQR is wide"])
    row = only_row(build_rows([result("cubist", merged=merged, loc=3)]), "cubist")
    assert row["noisy"] is True and row["noise"] == ["the speed-up's IQR is wide"]


def test_a_fidelity_metric_is_named_with_its_evaluator_and_its_in_job_delta_is_kept():
    record = result("cubist", merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3)
    record["metrics"]["fidelity"] = {"mask_iou": 0.9, "delta_mask_iou": -0.05}
    row = only_row(build_rows([record]), "cubist")
    assert (row["metric"], row["value"], row["delta"]) == ("fidelity/mask_iou", 0.9, -0.05)


@pytest.mark.parametrize(
    ("environment", "config_device", "device"),
    [
        ({}, "cpu", "cpu"),  # an old record without environment: the config's device
        ({"threads": 4}, "cpu", "cpu (4 threads)"),
        ({"device": "cuda:1"}, "cuda", "cuda:1"),  # what ran beats what was asked
        ({"device": "cuda:1", "gpu": "NVIDIA A100"}, "cuda", "NVIDIA A100"),
    ],
)
def test_the_device_column_names_the_gpu_else_the_device_and_its_threads(environment, config_device, device):
    record = cubist_record(environment=environment)
    record["config"]["device"] = config_device
    assert only_row(build_rows([record]), "cubist")["device"] == device


# --- token grid ---------------------------------------------------------------------------------------


def _with_tokens(merged_tokens, base_tokens=BASE_TOKENS, merge=None):
    record = result("cubist", merged=speed(12.5, 320.0, merged_tokens, 1.25, 1.25), loc=3)
    record["metrics"]["throughput"]["baseline"]["tokens"] = base_tokens
    if merge is not None:
        record["merge"] = merge
    return only_row(build_rows([record]), "cubist")


def test_the_out_grid_follows_r_h_and_r_w_on_a_square_input():
    # 64x64 less 8 rows and 4 columns: 56x60 = 3360 tokens, not a square
    row = _with_tokens(56 * 60, merge={"method": "cubist", "loc": 3, "r_h": 8, "r_w": 4})
    assert row["out_grid"] == "56x60" and row["schedule"] == "loc=3 r=8x4"
    # a token count that r_h/r_w do not explain is not labelled with their grid
    assert _with_tokens(3000, merge={"method": "cubist", "loc": 3, "r_h": 8, "r_w": 4})["out_grid"] == ""


def test_the_out_grid_ignores_r_h_and_r_w_beside_stages():
    # stages win over r_h/r_w (pipeline precedence): 3360 tokens from stages pin down no grid
    merge = {"method": "cubist", "stages": [[2, 4, 4], [6, 4, 0]], "r_h": 8, "r_w": 4}
    assert _with_tokens(56 * 60, merge=merge)["out_grid"] == ""


@pytest.mark.parametrize(
    ("merged_tokens", "base_tokens"),
    [(3000, BASE_TOKENS), (2304, 64 * 48), (None, BASE_TOKENS), (3136, None)],
)
def test_the_out_grid_is_blank_where_the_counts_do_not_pin_it_down(merged_tokens, base_tokens):
    # a non-square count, a non-square input, or a count not recorded
    row = _with_tokens(merged_tokens, base_tokens)
    assert row["out_grid"] == ""
    expected_kept = None if merged_tokens is None or base_tokens is None else 100 * merged_tokens / base_tokens
    assert row["kept_pct"] == (pytest.approx(expected_kept) if expected_kept is not None else None)


# --- timings judged again from their rounds --------------------------------------------------------------


def _rounds_record(base_ms, merged_ms, setup, method="cubist"):
    merged = speed(12.5, 320.0, 3136, 1.3, 1.25)
    merged.update(speedup_q1=1.3, speedup_q3=1.3, noisy=False, noise=[], times_ms=merged_ms)
    record = result(method, miou=68.5, merged=None if method == "none" else merged, loc=3)
    record["metrics"]["throughput"]["baseline"]["times_ms"] = base_ms
    record["metrics"]["throughput"]["setup"] = setup
    return record


def test_img_s_from_rounds_counts_the_batch():
    # 4 images in 80 ms a round: 50 img/s; 100 ms / 80 ms = 1.25x
    row = only_row(build_rows([_rounds_record([100.0] * 4, [80.0] * 4, {**SETUP, "batch_size": 4})]), "cubist")
    assert row["img_s"] == pytest.approx(4 / 0.080) and row["speedup"] == pytest.approx(1.25)
    # a setup that does not record its batch size timed one image a batch
    setup = {k: v for k, v in SETUP.items() if k != "batch_size"}
    row = only_row(build_rows([_rounds_record([100.0] * 4, [80.0] * 4, setup)]), "cubist")
    assert row["img_s"] == pytest.approx(1 / 0.080)


def test_a_loaded_cpu_makes_steady_rounds_noisy_and_a_gpu_does_not():
    # load 9.0 on 2 CPUs is far above cpus + LOAD_MARGIN
    load = {"before": {"load_1m": 9.0, "cpus": 2}, "after": {"load_1m": 1.0, "cpus": 2}}
    cpu = only_row(build_rows([_rounds_record([100.0] * 4, [80.0] * 4, {**SETUP, "device": "cpu", "load": load})]), "cubist")
    assert cpu["noisy"] is True and any("9.0" in reason and "2 CPUs" in reason for reason in cpu["noise"])
    gpu = only_row(build_rows([_rounds_record([100.0] * 4, [80.0] * 4, {**SETUP, "device": "cuda", "load": load})]), "cubist")
    assert gpu["noisy"] is False and gpu["noise"] == []
    # a setup that does not say its device is taken for the CPU, where the load counts
    unnamed = {k: v for k, v in SETUP.items() if k != "device"} | {"load": load}
    assert only_row(build_rows([_rounds_record([100.0] * 4, [80.0] * 4, unnamed)]), "cubist")["noisy"] is True


def test_the_unmerged_job_is_not_judged_noisy_against_itself():
    # rounds 100-200 ms vary by half their median, but a baseline's speed-up is 1.0 by definition
    record = _rounds_record([100.0, 100.0, 150.0, 200.0], None, SETUP, method="none")
    row = only_row(build_rows([record]), "none")
    assert (row["speedup"], row["speedup_q1"], row["speedup_q3"]) == (1.0, 1.0, 1.0)
    assert row["noisy"] is False and row["noise"] == []
    assert row["img_s"] == pytest.approx(1 / 0.125)  # the median round: (100 + 150) / 2 ms


@pytest.mark.parametrize(("base_ms", "merged_ms"), [([100.0] * 4, [80.0] * 3), ([100.0] * 4, None), (None, [80.0] * 4)])
def test_rounds_that_cannot_be_paired_leave_the_stored_numbers(base_ms, merged_ms):
    row = only_row(build_rows([_rounds_record(base_ms, merged_ms, SETUP)]), "cubist")
    assert (row["speedup"], row["speedup_q1"], row["noisy"], row["img_s"]) == (1.3, 1.3, False, 12.5)


# --- groups and references -----------------------------------------------------------------------------


def _config_differing_in(key):
    config = copy.deepcopy(SAM_CONFIG)
    if key == "model":
        config["model"]["name"] = "sam_l"
    elif key == "evaluator":
        config["evaluator"]["throughput"]["batch_size"] = 8
    elif key == "dataset":
        config["dataset"]["root"] = "/data/ade20k"
    else:
        config["device"] = "cpu"
    return config


@pytest.mark.parametrize("key", ["model", "evaluator", "dataset", "device"])
def test_jobs_that_differ_in_model_evaluator_dataset_or_device_get_their_own_reference(key):
    first = result("cubist", merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3)
    second = result("cubist", merged=speed(12.5, 320.0, 3136, 1.25, 1.25), config=_config_differing_in(key), loc=3)
    rows = build_rows([first, second])
    references = [r for r in rows if r["method"] == IN_PROCESS_BASELINE]
    assert [r["run"] for r in references] == ["median of 1 job(s)"] * 2
    assert rows[0]["group"] != rows[2]["group"] and [r["group"] for r in rows[:2]] == [rows[0]["group"]] * 2


def test_jobs_with_equal_configs_in_another_key_order_share_a_group(tmp_path):
    first = result("cubist", merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3)
    reordered = copy.deepcopy(SAM_CONFIG)
    reordered["evaluator"] = dict(reversed(list(reordered["evaluator"].items())))
    second = result("cubist", merged=speed(12.5, 320.0, 3136, 1.25, 1.25), config=reordered, loc=6)
    write(tmp_path, "0", first)
    write(tmp_path, "1", second)
    rows = build_rows(collect_results(tmp_path))
    assert [r["run"] for r in rows if r["method"] == IN_PROCESS_BASELINE] == ["median of 2 job(s)"]


def test_in_memory_records_with_paths_group_like_their_parsed_twins():
    # build_rows is public: a caller may pass records whose config still holds a Path
    with_path = copy.deepcopy(SAM_CONFIG)
    with_path["dataset"]["root"] = Path(SAM_CONFIG["dataset"]["root"])
    rows = build_rows([
        result("cubist", merged=speed(12.5, 320.0, 3136, 1.25, 1.25), config=with_path, loc=3),
        result("tome", merged=speed(13.0, 318.0, 3136, 1.3, 1.26), loc=3),
    ])
    assert [r["run"] for r in rows if r["method"] == IN_PROCESS_BASELINE] == ["median of 2 job(s)"]


def test_the_in_process_reference_row_stands_for_the_unmerged_model():
    config = {**SAM_CONFIG, "device": "cpu"}
    records = []
    for i, base_img_s in enumerate((9.0, 14.0, 10.0)):
        record = result("cubist", merged=speed(12.0, 300.0, 2304, 1.2, 1.3), config=config, ratio=0.25 + i / 10)
        record["metrics"]["throughput"]["baseline"]["img_s"] = base_img_s
        record["environment"] = {"device": "cpu", "threads": 2}
        records.append(record)
    rows = build_rows(records)
    reference = rows[0]
    # the unmerged model: all 4096 tokens and 400 GFLOPs of result()'s baseline, speed-up 1
    assert reference["method"] == IN_PROCESS_BASELINE and reference["status"] == "ok" and reference["reference"]
    assert (reference["model"], reference["schedule"], reference["out_grid"]) == ("sam_b", "-", "64x64")
    assert (reference["tokens"], reference["kept_pct"], reference["gflops"]) == (BASE_TOKENS, 100.0, 400.0)
    assert reference["img_s"] == 10.0  # the median of 9, 14 and 10
    assert [reference[k] for k in ("speedup", "speedup_q1", "speedup_q3", "flop_speedup")] == [1.0] * 4
    assert reference["noisy"] is False and reference["error"] == ""
    assert reference["run"] == "median of 3 job(s)"
    assert reference["device"] == "cpu (2 threads)" and reference["group"] == rows[1]["group"]
    assert reference["setup"] == SETUP
    line = cells(markdown_table(rows).splitlines()[2])
    assert [line[k] for k in ("status", "method", "kept_pct", "speedup", "noisy", "run")] == [
        "ok", IN_PROCESS_BASELINE, "100.0%", "1.00x", "", "median of 3 job(s)"]


def test_several_unmerged_jobs_are_averaged_into_the_reference():
    rows = build_rows([
        result("none", miou=70.0),
        result("none", miou=72.0),
        result("none", status="failed", error="CUDA out of memory"),
        result("cubist", miou=68.5, merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3),
        result("tome", miou=66.0, merged=speed(13.0, 318.0, 3136, 1.3, 1.26), loc=3),
    ])
    # reference accuracy (70 + 72) / 2 = 71
    assert only_row(rows, "cubist")["delta"] == pytest.approx(68.5 - 71.0)
    assert only_row(rows, "tome")["delta"] == pytest.approx(66.0 - 71.0)
    unmerged = [r for r in rows if r["method"] == "none"]
    assert [(r["status"], r["reference"]) for r in unmerged] == [("ok", True), ("ok", True), ("failed", False)]
    assert [r["delta"] for r in unmerged[:2]] == [pytest.approx(-1.0), pytest.approx(1.0)]
    # reference rows are not methods of the pivot
    pivot = pivot_markdown(rows).splitlines()
    assert [line.split(" | ")[0] for line in pivot[2:]] == ["| cubist", "| tome"]


def test_several_unmerged_jobs_without_accuracy_give_no_delta():
    rows = build_rows([result("none"), result("none"), result("cubist", merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3)])
    assert all(r["delta"] is None for r in rows) and len(rows) == 3


def test_a_delta_measured_inside_the_job_beats_the_groups_merge_none():
    record = result("cubist", miou=60.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3)
    record["metrics"]["miou"].update(unmerged_miou=61.5, delta_miou=-1.5)
    rows = build_rows([result("none", miou=70.0), record])
    assert only_row(rows, "cubist")["delta"] == -1.5  # not 60 - 70


def test_rows_are_ordered_reference_then_methods_then_schedules_numerically():
    def job(method, run, **merge):
        record = result(method, miou=60.0, loc=merge.get("loc"), ratio=merge.get("ratio", 0.125))
        record["merge"] = {"method": method, **merge} if method != "none" else None
        record["_run"] = run
        return record

    rows = build_rows([
        job("mystery", "a", loc=3, ratio=0.1),
        job("oracle", "b", loc=3, ratio=0.1),
        job("expedite", "c", loc=3, ratio=0.1, temperature=0.1),
        job("tome", "d", r=8),
        job("cubist", "e", loc=10, ratio=0.1),
        job("cubist", "f", loc=3, ratio=0.5),
        job("none", "g"),
    ])
    # none, cubist (1), tome (2, whatever its variant), expedite (3), oracle (5), unknown last;
    # cubist's loc 3 before loc 10 although "loc=10" sorts first as text
    assert [(r["method"], r["run"]) for r in rows] == [
        ("none", "g"), ("cubist", "f"), ("cubist", "e"), ("tome (per layer)", "d"), ("expedite (t=0.1)", "c"),
        ("oracle", "b"), ("mystery", "a"),
    ]


# --- markdown cells --------------------------------------------------------------------------------------


def test_the_markdown_header_names_every_column():
    header, rule = markdown_table([]).splitlines()
    assert header == ("| status | model | method | schedule | out grid | tokens | kept | GFLOPs | img/s | speed-up "
                      "| q1 | q3 | noisy | FLOP-ideal | metric | value | Δ vs none | run | error |")
    assert rule == "|" + "---|" * 19


def _cells_of(**row):
    return cells(markdown_table([row]).splitlines()[2])


def test_markdown_rounds_each_number_by_its_kind():
    line = _cells_of(kept_pct=76.5625, gflops=318.0, img_s=12.5, speedup=1.3, speedup_q1=1.28, speedup_q3=1.33,
                     noisy=False, flop_speedup=1.26, value=0.98765, delta=0.25)
    assert [line[k] for k in ("kept_pct", "gflops", "img_s", "speedup", "speedup_q1", "speedup_q3", "noisy",
                              "flop_speedup", "value", "delta")] == [
        "76.6%", "318.00", "12.50", "1.30x", "1.28x", "1.33x", "", "1.26x", "0.9877", "+0.25"]
    # two decimals from 1 up (by magnitude), four below: a small number keeps its digits
    assert [_cells_of(value=v)["value"] for v in (1.0, 1.5, 2.5, 0.5, -0.5, -2.5)] == [
        "1.00", "1.50", "2.50", "0.5000", "-0.5000", "-2.50"]
    assert [_cells_of(gflops=0.25)["gflops"], _cells_of(img_s=0.125)["img_s"]] == ["0.2500", "0.1250"]
    assert _cells_of(noisy=True, delta=-1.5)["noisy"] == "noisy" and _cells_of(delta=-1.5)["delta"] == "-1.50"


def test_blank_values_stay_blank_cells():
    assert set(_cells_of(**dict.fromkeys(COLUMN_KEYS, "")).values()) == {""}
    assert set(_cells_of(**dict.fromkeys(COLUMN_KEYS)).values()) == {""}


def test_markdown_errors_are_one_line_escaped_and_cut_at_90_characters():
    exactly = "E" * 90
    assert _cells_of(error=exactly)["error"] == exactly
    longer = "F" * 85 + "GHIJKL"  # 91 characters: the first 89 and an ellipsis, 90 in all
    assert _cells_of(error=longer)["error"] == "F" * 85 + "GHIJ" + "…"
    assert _cells_of(error="Traceback:\n  line 3\tboom")["error"] == "Traceback: line 3 boom"
    # a pipe would end the cell early
    line = markdown_table([{"error": "a|b", "status": "failed"}]).splitlines()[2]
    assert line.startswith("| failed |") and line.endswith(" | a\\|b |")


# --- setup line -------------------------------------------------------------------------------------


def test_describe_setup_names_devices_and_each_distinct_setup_once():
    reordered = dict(reversed(list(SETUP.items())))
    rows = [
        {"setup": {**SETUP, "load": {"before": {"load_1m": 0.5}}}, "device": "NVIDIA H100"},
        {"setup": {**reordered, "load": {"before": {"load_1m": 7.0}}}, "device": "NVIDIA H100"},  # same setup
        {"device": "cpu (2 threads)"},  # a failed job: no setup
    ]
    assert describe_setup(rows) == "device: NVIDIA H100, cpu (2 threads); throughput: fp32, batch 1, median of 3 (warm-up 1)"
    compiled = [{"setup": {**SETUP, "compile": True, "batch_size": 4}, "device": "NVIDIA H100"}]
    assert describe_setup(compiled) == "device: NVIDIA H100; throughput: fp32, batch 4, median of 3 (warm-up 1, compiled)"
    assert describe_setup([{"device": None}]) == "device: unknown"


# --- pivot ------------------------------------------------------------------------------------------


def _cell(method, schedule, speedup=None, value=None, status="ok", **extra):
    return {"status": status, "group": "g", "method": method, "schedule": schedule, "speedup": speedup,
            "value": value, "run": f"{method} {schedule}", **extra}


def test_the_pivot_lays_out_columns_in_numeric_order_and_lists_other_schedules_sorted():
    rows = [
        _cell("tome", "loc=10 ratio=0.1", 1.5, 0.95),
        _cell("cubist", "loc=3 ratio=0.1", 1.2, None),  # speed only
        _cell("tome", "loc=3 ratio=0.1", None, 0.98),  # accuracy only
        _cell("expedite", "loc=3 ratio=0.6", status="failed"),  # a failed job takes no column
        _cell("tome (per layer)", "r=8/layer", 1.3, None),
        _cell("cubist", "stages=[[2,4,4]]", 2.5, 0.9),
    ]
    assert pivot_markdown(rows).splitlines() == [
        "| method | loc=3 ratio=0.1 | loc=10 ratio=0.1 |",
        "|---|---|---|",
        "| cubist | 1.20x | - |",
        "| tome | 0.980 / - | 0.950 / 1.50x |",
        "",
        "Other schedules:",
        "- cubist stages=[[2,4,4]]: 0.900 / 2.50x",
        "- tome (per layer) r=8/layer: 1.30x",
    ]


def test_pivot_columns_with_a_word_where_others_have_a_number_sort_after_them():
    """loc=auto beside loc=3 (an unresolved loc from a config) once raised a TypeError comparing
    'auto' with 3.0 and took the whole report down."""
    rows = [_cell(m, s, 1.2, 0.9) for m in ("cubist", "tome") for s in ("loc=auto ratio=0.125", "loc=3 ratio=0.125")]
    assert pivot_markdown(rows).splitlines()[0] == "| method | loc=3 ratio=0.125 | loc=auto ratio=0.125 |"


def test_no_pivot_without_two_methods_or_a_successful_row():
    assert pivot_markdown([]) == ""
    assert pivot_markdown([_cell("cubist", "loc=3 ratio=0.1", status="failed"),
                           _cell("tome", "loc=3 ratio=0.1", status="failed")]) == ""
    assert pivot_markdown([_cell("cubist", "loc=3 ratio=0.1", 1.2, 0.9), _cell("cubist", "loc=6 ratio=0.1", 1.1, 0.95)]) == ""


# --- report.md and report.csv -----------------------------------------------------------------------------


def _two_method_sweep(root: Path, miou=True) -> Path:
    write(root, "0", result("cubist", miou=68.5 if miou else None, merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3))
    write(root, "1", result("tome", miou=66.0 if miou else None, merged=speed(13.0, 318.0, 3136, 1.3, 1.26), loc=3))
    write(root, "2", result("expedite", status="failed", error="boom", loc=3))
    return root


def test_report_md_keeps_every_block_separated_so_tables_render(tmp_path):
    rows = build_rows(collect_results(_two_method_sweep(tmp_path / "sweep")))
    md, _ = write_report(rows, tmp_path / "out", [tmp_path / "sweep"], plot="pareto.png")
    text = md.read_text()
    lines = text.split("\n")
    assert lines[0].startswith("# ") and lines[1] == ""
    assert lines[2].startswith("Source: ") and lines[4] == ""
    # 4 rows (in-process reference, cubist, tome, failed expedite), 1 of them not ok
    assert lines[3].startswith("4 rows, 1 not ok. device: NVIDIA H100; throughput: fp32, batch 1")
    table = markdown_table(rows).split("\n")
    t = lines.index(table[0])
    assert lines[t - 1] == "" and lines[t: t + len(table)] == table and lines[t + len(table)] == ""
    pivot = pivot_markdown(rows).split("\n")
    p = lines.index(pivot[0])
    assert lines[p: p + len(pivot)] == pivot and lines[p + len(pivot)] == "" and lines[p - 1] == ""
    assert "miou / speed-up" in lines[p - 2] and lines[p - 3] == ""
    assert p < t, "the pivot comes before the full table"
    # the plot is its own paragraph and the file ends with one newline
    assert lines[-3:] == ["", "![Pareto plot](pareto.png)", ""]


def test_report_md_pivot_caption_without_accuracy_and_the_noisy_warning_paragraph(tmp_path):
    root = tmp_path / "sweep"
    noisy = speed(12.5, 320.0, 3136, 1.25, 1.25) | {"speedup_q1": 1.0, "speedup_q3": 1.6, "noisy": True}
    write(root, "0", result("cubist", merged=noisy, loc=3))
    write(root, "1", result("tome", merged=noisy | {"speedup": 1.3}, loc=3))
    rows = build_rows(collect_results(root))
    text, _ = write_report(rows, tmp_path / "out", [root])
    lines = text.read_text().split("\n")
    p = lines.index(pivot_markdown(rows).split("\n")[0])
    assert "speed-up" in lines[p - 2] and " / speed-up" not in lines[p - 2]
    (w,) = [i for i, line in enumerate(lines) if "group(s) is noisy" in line]
    assert lines[w - 1] == "" and lines[w + 1] == "" and "1 of 1 group(s)" in lines[w]
    assert lines[-1] == "" and lines[-2].startswith("|")


def test_report_md_counts_rows_not_ok_and_creates_missing_directories(tmp_path):
    rows = build_rows(collect_results(_two_method_sweep(tmp_path / "sweep")))
    rows.append({**rows[-1], "status": "no results", "run": "3"})
    out = tmp_path / "reports" / "sam_b" / "latest"  # neither parent exists yet
    md, csv_path = write_report(rows, out, ["sweep"])
    assert md.parent == out and csv_path.parent == out
    assert md.read_text().split("\n")[3].startswith("5 rows, 2 not ok. ")


@pytest.mark.parametrize(
    ("sources", "shown"),
    [
        (["a"], "a"),
        (["a", "b", "c"], "a, b, c"),
        (["a", "b", "c", "d"], "a, b, ... (4 directories, the last d)"),
        ([Path("s/1"), Path("s/2"), Path("s/3"), Path("s/4"), Path("s/5")], "s/1, s/2, ... (5 directories, the last s/5)"),
    ],
)
def test_report_md_names_its_sources(tmp_path, sources, shown):
    md, _ = write_report([], tmp_path, sources)
    assert md.read_text().split("\n")[2] == f"Source: {shown}  "


def test_report_csv_leaves_missing_numbers_blank_and_takes_partial_rows(tmp_path):
    rows = build_rows(collect_results(_two_method_sweep(tmp_path / "sweep")))
    rows.append({"status": "ok", "group": "other", "method": "cubist", "schedule": "loc=3 ratio=0.1", "run": "x",
                 "speedup": 1.2})  # a hand-made row carrying some columns only
    _, csv_path = write_report(rows, tmp_path / "out", ["sweep"])
    with csv_path.open(newline="") as handle:
        written = list(csv.DictReader(handle))
    failed = next(r for r in written if r["status"] == "failed")
    assert failed["speedup"] == "" and failed["tokens"] == "" and failed["error"] == "boom"
    assert written[-1]["speedup"] == "1.2" and written[-1]["tokens"] == "" and written[-1]["error"] == ""
