"""Merge requests are validated once, with messages that name the value and the fix."""

import pytest
from omegaconf import OmegaConf

from spatialmerge.adapters.config import MergeConfig, Stage


def test_single_stage_from_ratio_and_from_r():
    config = MergeConfig.create("cubist", loc=3, ratio=0.125)
    assert config.stages == (Stage(3, ratio=0.125),)
    assert config.stages[0].removal((64, 64), None, "none") == (8, 8)
    assert config.stages[0].removal((64, 64), 14, "window") == (8, 8)
    config = MergeConfig.create("cubist", loc=1, r_h=1, r_w=2)
    assert config.stages[0].removal((14, 14), None, "none") == (1, 2)


def test_stages_accept_tuples_dicts_and_hydra_lists():
    stages = OmegaConf.create([[1, 2, 3], {"loc": 4, "ratio": 0.1}])
    config = MergeConfig.create("cubist", stages=stages)
    assert config.stages == (Stage(1, 2, 3), Stage(4, ratio=0.1))


def test_per_layer_tome_schedule_forms():
    assert MergeConfig.create("tome", r=8).per_layer
    assert MergeConfig.create("tome", r=(8, -1.0)).r == (8, -1.0)
    assert MergeConfig.create("tome", r=OmegaConf.create([4, 4, 2])).r == [4, 4, 2]
    assert not MergeConfig.create("tome", loc=2, ratio=0.1).per_layer


def test_none_is_no_merge_and_expedite_keeps_its_options():
    assert MergeConfig.create("none").method == "none"
    config = MergeConfig.create("expedite", loc=2, ratio=0.2, k=5)
    # unset options wait for the backbone's reference defaults, set ones win over them
    defaults = {"n_iters": 3, "temperature": 0.1, "window_size": 5, "k": 36,
                "reconstruct": "l2", "windowed": False}
    filled = config.with_defaults(defaults)
    assert filled.grid_options() == {"n_iters": 3, "temperature": 0.1, "window_size": 5, "k": 5,
                                     "reconstruct": "l2"}
    assert not filled.windowed
    auto = MergeConfig.create("expedite", loc=2, ratio=0.2, temperature="auto").with_defaults(defaults)
    assert auto.grid_options()["temperature"] == "auto"
    assert MergeConfig.create("cubist", loc=2, ratio=0.2, reduce="mean").grid_options() == {
        "reduce": "mean",
        "collisions": "exact",
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="cubist"), "needs a schedule"),
        (dict(method="cubist", ratio=0.1), "needs loc"),
        (dict(method="cubist", loc=-1, ratio=0.1), "loc=-1 must be a block index"),
        (dict(method="cubist", loc=1, ratio=0.1, r_h=1, r_w=1), "set one of them"),
        (dict(method="cubist", stages=[(3, 1, 1), (2, 1, 1)]), r"\[3, 2\] must be strictly increasing"),
        (dict(method="tome", stages=[(1, 1, 1), (2, 1, 1)]), "several stages are supported for cubist only"),
        (dict(method="cubist", r=4), "per-layer schedule"),
        (dict(method="tome", r=-1), "non-negative"),
        (dict(method="cubist", loc=1, ratio=0.1, metric="queries"), "metric='queries' .* tokens, keys, normed"),
        (dict(method="cubist", loc=1, ratio=0.1, positions="mean"), "positions='mean' .* grid, centroid"),
        (dict(method="cubist", loc=1, ratio=0.1, align="grid"), "align='grid' .* none, window"),
        (dict(method="cubist", loc=1, ratio=0.1, collisions="last"), "collisions='last' .* exact, reference"),
        (dict(method="expedite", loc=1, ratio=0.1, metric="keys"), "clusters the tokens themselves"),
        (dict(method="expedite", loc=1, ratio=0.1, reconstruct="sum"), "reconstruct='sum' .* l2, softmax"),
        (dict(method="expedite", loc=1, ratio=0.1, windowed="yes"), "windowed='yes' must be true, false or null"),
        (dict(method="cubist", loc=1, ratio=0.1, temperature=0.1), "temperature is an Expedite option, not used by method='cubist'"),
        (dict(method="pool", loc=1, ratio=0.1, k=4, n_iters=2), "n_iters, k are Expedite options"),
        (dict(method="tome", loc=1, ratio=0.1, reduce="mean"), "reduce='mean': CubistMerge options, not used by method='tome'"),
        (dict(method="oracle", loc=1, ratio=0.1, metric="keys"), "metric='keys' is not used by method='oracle'"),
        (dict(method="cubist", stages=[(1, 2)], loc=1), "not both"),
        (dict(method="cubist", stages=[(1, 2, 3, 4)]), r"must be \(loc, r_h, r_w\)"),
        (dict(method="cubist", loc=1, r_h=1.5, r_w=1), r"r_h=1.5 must be a whole number of tokens"),
        (dict(method="cubist", loc=1, r_h=True, r_w=1), r"r_h=True must be a whole number"),
        (dict(method="cubist", loc=1, r_h=1, r_w=-2), r"r_w=-2 must be a whole number of tokens >= 0"),
        (dict(method="cubist", stages=[(1, 2.5, 2)]), r"r_h=2.5 must be a whole number"),
        (dict(method="cubist", loc=1, ratio="abc"), r"ratio='abc' must be a number in \[0, 0.5\)"),
    ],
)
def test_bad_requests_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeConfig.create(**kwargs)


def test_a_ratio_that_rounds_to_nothing_is_refused_not_reported_as_a_merge():
    stage = MergeConfig.create("cubist", loc=2, ratio=0.05).stages[0]
    with pytest.raises(ValueError, match=r"ratio=0.05 on the 8x8 grid at loc=2 rounds to r_h=r_w=0.*more than 0.0625 per axis, e.g. 0.125"):
        stage.removal((8, 8), None, "none")
    assert stage.removal((64, 64), None, "none") == (3, 3)
    # align=window: 64 at ratio 0.04 would land back on the full grid
    aligned = MergeConfig.create("cubist", loc=2, ratio=0.04, align="window").stages[0]
    with pytest.raises(ValueError, match=r"with align=window \(windows of 14\) on the 64x64 grid.*multiple of 14"):
        aligned.removal((64, 64), 14, "window")
    # asking for nothing explicitly is fine: r_h=r_w=0 is the identity, by request
    assert MergeConfig.create("cubist", loc=2, r_h=0, r_w=0).stages[0].removal((8, 8), None, "none") == (0, 0)
