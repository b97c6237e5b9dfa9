"""The one timing summary every speed-up comes from, on injected round times: median of
per-round ratios, quartiles, and the noisy flag with its reasons."""

from __future__ import annotations

import pytest
import torch

from spatialmerge.evaluators.throughput import ThroughputEvaluator, Variant
from spatialmerge.evaluators.timing import machine_load, speedup_text, summarise_rounds


def test_speedup_is_the_median_of_per_round_ratios_with_known_quartiles():
    row = summarise_rounds([0.002, 0.002, 0.002, 0.004], [0.001, 0.001, 0.001, 0.001], batch_size=2)
    assert row["speedup"] == pytest.approx(2.0)  # baseline / merged, never the other way round
    assert row["speedup_q1"] == pytest.approx(2.0) and row["speedup_q3"] == pytest.approx(2.5)
    assert row["img_s"] == pytest.approx(2000.0) and row["ms_per_batch"] == pytest.approx(1.0)
    assert row["times_ms"] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # IQR 0.5 is exactly half the gain of 1.0 and the baseline's IQR exactly 25% of its median:
    # both at, not over, their limits
    assert row["noisy"] is False and row["noise"] == []
    assert speedup_text(row) == "2.00x (2.00-2.50)"


def test_a_ratio_that_varies_across_rounds_is_noisy():
    row = summarise_rounds([0.002] * 4, [0.001, 0.0018, 0.001, 0.0019], batch_size=1)
    assert row["speedup"] == pytest.approx((2.0 + 2 / 1.8) / 2)
    assert row["noisy"] is True
    assert any("wider than half its gain" in reason for reason in row["noise"])
    assert speedup_text(row).endswith(" noisy")


def test_a_busy_baseline_is_noisy_even_when_the_ratio_is_steady():
    """A machine whose speed changed between rounds: every ratio is 2.0, but the rounds of each
    variant vary ten-fold, so neither img/s means anything."""
    baseline = [0.001, 0.010, 0.001, 0.010, 0.001]
    row = summarise_rounds(baseline, [t / 2 for t in baseline], batch_size=1)
    assert row["speedup"] == pytest.approx(2.0) and row["speedup_q3"] - row["speedup_q1"] == pytest.approx(0.0)
    assert row["noisy"] is True
    assert any("unmerged rounds vary" in reason for reason in row["noise"])


def test_medians_that_contradict_the_paired_speed_up_are_noisy():
    # the case: the unmerged median says 0.6 img/s, the merged 2.9, the pairs 1.03x
    baseline = [0.145, 1.653, 2.088, 1.744, 0.092]
    merged = [0.141, 0.342, 2.030, 0.330, 0.090]
    row = summarise_rounds(baseline, merged, batch_size=1)
    assert row["noisy"] is True
    assert any("ratio of median times" in reason and "disagrees" in reason for reason in row["noise"])


def test_medians_a_little_off_the_paired_interval_are_not_noise():
    """Five quiet rounds: the medians' ratio (1.39x) just above the pairs' IQR (1.34-1.38) is
    rounding, not a contradiction."""
    baseline = [1.00, 1.02, 1.01, 1.03, 1.00]
    merged = [b / r for b, r in zip(baseline, [1.34, 1.35, 1.36, 1.38, 1.38])]
    merged[0], merged[4] = 0.722, 0.740
    row = summarise_rounds(baseline, merged, batch_size=1)
    assert not any("median times" in reason for reason in row["noise"]), row


def test_a_loaded_machine_is_named_in_the_reasons():
    load = {"load_1m": 6.5, "cpus": 2, "threads": 2}
    row = summarise_rounds([0.002] * 3, [0.001] * 3, batch_size=1, load=load)
    assert row["noisy"] is True and row["noise"] == ["load average 6.5 on 2 CPUs"]
    assert summarise_rounds([0.002] * 3, [0.001] * 3, 1, load={**load, "load_1m": 1.0})["noisy"] is False


def test_the_baseline_row_is_one_by_definition():
    row = summarise_rounds([0.001, 0.003], [0.001, 0.003], batch_size=1, is_baseline=True)
    assert (row["speedup"], row["speedup_q1"], row["speedup_q3"], row["noisy"]) == (1.0, 1.0, 1.0, False)


def test_unpaired_rounds_are_refused():
    with pytest.raises(ValueError, match="rounds must be paired"):
        summarise_rounds([0.001, 0.002], [0.001], batch_size=1)


def test_the_throughput_evaluator_reports_what_the_summary_computes():
    """The evaluator's rows come from ``summarise_rounds`` on the variants' own rounds."""
    evaluator = ThroughputEvaluator(batch_size=1, iters=4)
    module = torch.nn.Identity()
    base = Variant("baseline", module, [0.002, 0.002, 0.002, 0.004], flops=4)
    merged = Variant("cubist", module, [0.001, 0.001, 0.001, 0.001], flops=2)
    idle = {"load_1m": 0.1, "cpus": 2, "threads": 2}
    rows = evaluator._summarise([base, merged], torch.device("cpu"), {"before": idle, "after": idle})
    assert rows["cubist"]["speedup"] == pytest.approx(2.0)
    assert (rows["cubist"]["speedup_q1"], rows["cubist"]["speedup_q3"]) == pytest.approx((2.0, 2.5))
    assert rows["cubist"]["flop_speedup"] == pytest.approx(2.0) and rows["cubist"]["noisy"] is False
    assert rows["setup"]["load"]["before"] == idle
    busy = {"load_1m": 5.0, "cpus": 2, "threads": 2}
    rows = evaluator._summarise([base, merged], torch.device("cpu"), {"before": idle, "after": busy})
    assert rows["cubist"]["noisy"] is True and "load average 5.0 on 2 CPUs" in rows["cubist"]["noise"]


def test_the_machine_load_is_read():
    load = machine_load()
    assert load["cpus"] >= 1 and load["threads"] == torch.get_num_threads()
    assert load["load_1m"] is None or load["load_1m"] >= 0


def test_the_logger_summary_keeps_the_interval_and_the_noise_verdict():
    from spatialmerge.jobs import summary_metrics

    row = summarise_rounds([0.002] * 4, [0.001, 0.0018, 0.001, 0.0019], batch_size=1)
    metrics = {"throughput": {"baseline": summarise_rounds([0.002] * 4, [0.002] * 4, 1, is_baseline=True),
                              "cubist": row, "setup": {"iters": 4}}}
    merged = summary_metrics(metrics)["throughput"]["merged"]
    assert merged["noisy"] is True and merged["noise"] == row["noise"]
    assert (merged["speedup_q1"], merged["speedup_q3"]) == (row["speedup_q1"], row["speedup_q3"])
    assert "times_ms" not in merged  # per-round timings stay in results.json


def test_the_timing_process_own_threads_are_not_other_work():
    """An idle 2-core machine reads about 2.0-2.1 while the timing's own 2 threads run; more than
    half a core beyond the CPU count is other work."""
    from spatialmerge.evaluators.timing import host_load

    loads = {"before": {"load_1m": 2.1, "cpus": 2, "threads": 2}, "after": {"load_1m": 1.9, "cpus": 2, "threads": 2}}
    assert host_load(loads, "cpu") is None
    loads["after"]["load_1m"] = 2.6
    assert host_load(loads, "cpu") == loads["after"]
    assert host_load(loads, "cuda:0") is None  # a GPU timing does not depend on the host's load
