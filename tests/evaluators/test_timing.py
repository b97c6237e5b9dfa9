"""The one timing summary every speed-up comes from, on injected round times: median of
per-round ratios, quartiles, and the noisy flag with its reasons."""

from __future__ import annotations

import pytest
import torch

from spatialmerge.evaluators.throughput import ThroughputEvaluator, Variant
from spatialmerge.evaluators.timing import (
    LOAD_MARGIN,
    host_load,
    machine_load,
    overloaded,
    quartiles,
    speedup_text,
    summarise_rounds,
)


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


def test_the_variants_own_quartiles_and_a_single_round():
    row = summarise_rounds([0.004, 0.004, 0.004, 0.004, 0.004], [0.001, 0.002, 0.003, 0.004, 0.005], batch_size=1)
    # inclusive quartiles of 1..5 ms: 2, 3, 4
    assert (row["ms_q1"], row["ms_per_batch"], row["ms_q3"]) == pytest.approx((2.0, 3.0, 4.0))
    one = summarise_rounds([0.003], [0.002], batch_size=4)
    assert (one["ms_q1"], one["ms_per_batch"], one["ms_q3"]) == pytest.approx((2.0, 2.0, 2.0))
    assert (one["speedup_q1"], one["speedup"], one["speedup_q3"]) == pytest.approx((1.5, 1.5, 1.5))
    assert one["img_s"] == pytest.approx(2000.0)
    two = summarise_rounds([0.004, 0.004], [0.001, 0.002], batch_size=1)
    assert (two["speedup_q1"], two["speedup"], two["speedup_q3"]) == pytest.approx((2.5, 3.0, 3.5))


def test_the_noise_reasons_say_by_how_much():
    # merged rounds 1, 1, 2, 3 ms: IQR 1.25 over median 1.5 = 83%
    row = summarise_rounds([0.004] * 4, [0.001, 0.001, 0.002, 0.003], batch_size=1)
    assert "the merged rounds vary by 83% (IQR / median)" in row["noise"]


def test_half_the_gain_is_the_limit_of_the_speed_ups_spread():
    """Gain 0.1: an IQR of 0.03 is under half of it, one of 0.06 over (a rule that divided by
    the gain, a limit of 5, would pass both)."""
    tight = summarise_rounds([0.0011] * 4, [0.00095, 0.001, 0.001, 0.00105], batch_size=1)
    wide = summarise_rounds([0.0011] * 4, [0.0009, 0.001, 0.001, 0.0011], batch_size=1)
    for row, spread in ((tight, 0.0275), (wide, 0.0556)):
        assert row["speedup"] == pytest.approx(1.1)
        assert row["speedup_q3"] - row["speedup_q1"] == pytest.approx(spread, abs=5e-4)
    assert tight["noisy"] is False, tight["noise"]
    assert wide["noise"] == ["the speed-up's IQR 1.08-1.13x is wider than half its gain"]


def test_the_load_rule_is_strictly_above_the_margin_and_reads_the_busiest_reading():

    assert overloaded({"load_1m": 2 + LOAD_MARGIN, "cpus": 2}) is False  # at the margin: idle
    assert overloaded({"load_1m": 2 + LOAD_MARGIN + 0.01, "cpus": 2}) is True
    busy = {"load_1m": 3.0, "cpus": 2}
    # a reading without a load average counts as 0, never as busier than a real reading
    assert host_load({"before": {"load_1m": None, "cpus": 2}, "after": busy}, "cpu") == busy
    assert host_load({"before": {"load_1m": None, "cpus": 2}, "after": {"load_1m": 0.5, "cpus": 2}}, "cpu") is None
    assert host_load({"before": busy}, "cuda:0") is None


def test_the_speedup_text_needs_both_ends_of_the_interval():
    assert speedup_text({"speedup": 1.5, "speedup_q1": 1.4, "speedup_q3": None}) == "1.50x"
    assert speedup_text({"speedup": 1.5, "speedup_q1": 1.4, "speedup_q3": 1.6, "noisy": True}) == "1.50x (1.40-1.60) noisy"


def test_the_machine_load_is_the_one_minute_average(monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (1.25, 7.0, 9.0))
    assert machine_load()["load_1m"] == 1.25

    def unavailable():
        raise OSError

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert machine_load()["load_1m"] is None


def test_no_rounds_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="no timed rounds to summarise: set iters >= 1"):
        quartiles([])


def test_medians_exactly_at_the_ends_of_the_tolerance_are_not_noise():
    """The medians' ratio may sit anywhere in [q1 - slack, q3 + slack], ends included (slack =
    half the gain). Times in units of 2**-10 s, so every ratio below is exact in binary."""
    unit = 2.0**-10
    # ratios 2, 1, 2: quartiles 1.5, 2, 2; gain 1, slack 0.5; medians 2 / 2 = 1.0 = 1.5 - 0.5
    low = summarise_rounds([2 * unit, 2 * unit, 4 * unit], [1 * unit, 2 * unit, 2 * unit], batch_size=1)
    assert (low["speedup_q1"], low["speedup"], low["speedup_q3"]) == (1.5, 2.0, 2.0)
    # ratios 1, 2, 1.5: quartiles 1.25, 1.5, 1.75; gain 0.5, slack 0.25; medians 2 / 1 = 2.0 = 1.75 + 0.25
    high = summarise_rounds([1 * unit, 2 * unit, 3 * unit], [1 * unit, 1 * unit, 2 * unit], batch_size=1)
    assert (high["speedup_q1"], high["speedup"], high["speedup_q3"]) == (1.25, 1.5, 1.75)
    for row in (low, high):
        assert not any("median times" in reason for reason in row["noise"]), row["noise"]


def test_rounds_with_a_zero_median_are_not_divided_by():
    # a clock too coarse to see the unmerged forward reads 0 s: its spread over its median is
    # undefined, so that check is skipped instead of dividing by zero
    row = summarise_rounds([0.0, 0.0, 0.0], [0.001, 0.001, 0.001], batch_size=1)
    assert row["speedup"] == 0.0
    assert not any("unmerged rounds vary" in reason for reason in row["noise"])


def test_a_timing_size_the_model_cannot_run_is_refused_before_any_round():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=1).eval()
    evaluator = ThroughputEvaluator(iters=1, warmup=0, image_size=96, progress=False)
    with pytest.raises(ValueError, match=r"evaluator.throughput.image_size=96: the model runs at 64 px .* "
                                         r"model.image_size=96"):
        evaluator.evaluate(model, {"cubist": {"method": "cubist", "loc": 0, "r_h": 1, "r_w": 1}})


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (100, r"evaluator.throughput.image_size=100 is not a multiple of the model's 16-px patches; the "
              r"nearest sizes are 96 and 112, or drop it for the model's own 64"),
        (0, r"evaluator.throughput.image_size=0 must be a whole number of pixels, e.g. the model's own 64"),
        (True, r"evaluator.throughput.image_size=True must be a whole number"),
        (63.5, r"evaluator.throughput.image_size=63.5 must be a whole number"),
    ],
)
def test_a_timing_size_no_model_could_run_is_refused_naming_a_size_that_can(size, message):
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=1).eval()
    with pytest.raises(ValueError, match=message):
        ThroughputEvaluator(iters=1, warmup=0, image_size=size, progress=False).check(model)
    ThroughputEvaluator(image_size=64).check(model)  # its own size needs no trial forward
    assert not model.training


def test_a_timing_size_is_refused_before_any_other_evaluator_runs(monkeypatch):
    import timm
    from omegaconf import OmegaConf

    from spatialmerge.evaluators.fidelity import FidelityEvaluator
    from spatialmerge.pipeline import EvalContext, run_evaluators

    ran = []
    monkeypatch.setattr(FidelityEvaluator, "run", lambda self, ctx: ran.append("fidelity") or {})
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=1, num_classes=0).eval()
    cfg = OmegaConf.create({"evaluator": {
        "fidelity": {"_target_": "spatialmerge.evaluators.FidelityEvaluator"},
        "throughput": {"_target_": "spatialmerge.evaluators.ThroughputEvaluator", "image_size": 96},
    }})
    merge = {"method": "cubist", "loc": 0, "r_h": 1, "r_w": 1}
    with pytest.raises(ValueError, match=r"evaluator.throughput.image_size=96: the model runs at 64 px"):
        run_evaluators(cfg, EvalContext(model, merge, "cpu"))
    assert ran == [], "the fidelity evaluator ran before the timing size was refused"

