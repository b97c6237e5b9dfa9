"""What a user asks for when patching a model: method, schedule and variants, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from spatialmerge.merging.cubist import (
    COLLISION_RULES,
    REDUCE_RULES,
    check_choice,
    check_ratio,
    ratio_to_r,
    window_aligned_r,
)
from spatialmerge.merging.expedite import RECONSTRUCT_RULES
from spatialmerge.merging.grid import GRID_METHODS
from spatialmerge.merging.tome import parse_r

METHODS: tuple[str, ...] = ("none", *GRID_METHODS)
EXPEDITE_KEYS: tuple[str, ...] = (
    "n_iters", "temperature", "window_size", "k", "reconstruct", "windowed"
)
METRICS: tuple[str, ...] = ("tokens", "keys", "normed")
POSITIONS: tuple[str, ...] = ("grid", "centroid")
ALIGNS: tuple[str, ...] = ("none", "window")
SCHEDULE_KEYS: tuple[str, ...] = ("loc", "ratio", "r_h", "r_w", "stages", "r")
# What ``merge=none`` (configs/merge/none.yaml) holds: no schedule, the variants at the paper's
# choice. Any other value would be an option the unmerged model does not use.
UNMERGED_VALUES: dict[str, Any] = {
    "align": "none", "reduce": "maxmag", "collisions": "exact", "metric": "tokens",
    "positions": "grid", "recover": False,
}


def default_prop_attn(method: str, per_layer: bool) -> bool:
    """What ``prop_attn=None`` means: each method as its authors run it. Faithful per-layer
    ToMe uses proportional attention; CubistMerge (the paper), Expedite and the grid baselines
    do not."""
    return method == "tome" and per_layer


def check_unmerged(options: Mapping[str, Any]) -> None:
    """Refuse a ``merge=none`` config that sets an option: the unmerged model would run and the
    option would be silently ignored (e.g. ``merge=none merge.ratio=0.1``)."""
    unused = {k: v for k, v in options.items() if v != UNMERGED_VALUES.get(k)}
    if unused:
        shown = ", ".join(f"merge.{k}={v}" for k, v in unused.items())
        reset = " ".join(f"merge.{k}={_config_text(UNMERGED_VALUES.get(k))}" for k in unused)
        raise ValueError(
            f"merge=none runs the unmerged model, which does not use {shown}; drop "
            f"{'it' if len(unused) == 1 else 'them'} ({reset}) or choose a method, e.g. merge=cubist"
        )


def _config_text(value: Any) -> str:
    """``value`` as a Hydra override writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def with_default_loc(options: Mapping[str, Any], loc: int) -> dict[str, Any]:
    """``options`` with ``loc`` filled in where a single grid merge (a ratio or r_h / r_w, no
    stages, no per-layer r) leaves it out or None: the meaning of the configs' ``loc: null``."""
    single = any(options.get(k) is not None for k in ("ratio", "r_h", "r_w"))
    if options.get("loc") is None and single and not options.get("stages") and options.get("r") is None:
        return {**options, "loc": loc}
    return dict(options)


def merge_options(merge: Mapping[str, Any], default_loc: int | None = None) -> dict[str, Any] | None:
    """A ``merge`` config -> ``spatialmerge.patch`` keyword arguments; None for ``method: none``.

    Precedence, so sweeps can set every key for every method: ``r`` (per-layer ToMe) >
    ``stages`` > ``r_h``/``r_w`` > ``ratio``. ``loc: null`` stays None (``patch`` resolves it
    against the backbone) unless ``default_loc`` is given; ``prop_attn: null`` becomes the
    method's own default.
    """
    options = dict(OmegaConf.to_container(OmegaConf.create(dict(merge)), resolve=True))
    method = options.pop("method")
    if method == "none":
        check_unmerged(options)
        return None
    schedule = {k: options.pop(k, None) for k in SCHEDULE_KEYS}
    if schedule["r"] is not None:
        # ratio is every tome config's default; an explicit grid schedule beside r is a config
        # that would not run as written
        clash = [k for k in ("loc", "r_h", "r_w", "stages") if schedule[k] not in (None, [], ())]
        if clash:
            raise ValueError(
                f"merge.r={schedule['r']} is per-layer ToMe, which has no grid schedule, but "
                f"{', '.join(f'merge.{k}={schedule[k]}' for k in clash)} "
                f"{'is' if len(clash) == 1 else 'are'} set too; unset "
                f"{'it' if len(clash) == 1 else 'them'} ({' '.join(f'merge.{k}=null' for k in clash)}) "
                "or drop merge.r for single-layer ToMe on the grid"
            )
        chosen: dict[str, Any] = {"r": schedule["r"]}
    elif schedule["stages"]:
        if schedule["loc"] is not None:
            raise ValueError(
                f"merge.stages={schedule['stages']} gives each merge its block, so merge.loc={schedule['loc']} "
                "would be ignored; drop it (merge.loc=null)"
            )
        chosen = {"stages": schedule["stages"]}
    elif schedule["r_h"] is not None or schedule["r_w"] is not None:
        chosen = {"loc": schedule["loc"], "r_h": schedule["r_h"], "r_w": schedule["r_w"]}
    else:
        chosen = {"loc": schedule["loc"], "ratio": schedule["ratio"]}
    if chosen.get("ratio") == 0 or (chosen.get("r_h") == 0 and chosen.get("r_w") == 0):
        given = "merge.ratio=0" if chosen.get("ratio") == 0 else "merge.r_h=0 merge.r_w=0"
        raise ValueError(
            f"{given} merges nothing: the run would be the unmerged model recorded as {method}; use "
            "merge=none for the unmerged model, or a ratio in (0, 0.5) / r_h, r_w >= 1 for a merge"
        )
    if default_loc is not None:
        chosen = with_default_loc(chosen, default_loc)
    # what runs, not only what was asked: null is the method's own default
    if options.get("prop_attn") is None:
        options["prop_attn"] = default_prop_attn(method, "r" in chosen)
    return {"method": method, **chosen, **options}


@dataclass(frozen=True)
class Stage:
    """One merge: before block ``loc`` runs, shrink the grid by ``(r_h, r_w)`` or by ``ratio``."""

    loc: int
    r_h: int | None = None
    r_w: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loc, bool) or not isinstance(self.loc, int) or self.loc < 0:
            raise ValueError(f"loc={self.loc!r} must be a block index >= 0 (merge before that block)")
        for name in ("r_h", "r_w"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(
                    f"{name}={value!r} must be a whole number of tokens >= 0 (a row or column "
                    f"count, never rounded); e.g. merge.{name}=2, or give a ratio"
                )
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))):
            raise ValueError(f"ratio={self.ratio!r} must be a number in [0, 0.5), e.g. merge.ratio=0.125")
        by_r = self.r_h is not None or self.r_w is not None
        if by_r and self.ratio is not None:
            raise ValueError(
                f"stage at loc={self.loc} sets both ratio={self.ratio} and r_h/r_w="
                f"{self.r_h}/{self.r_w}; set one of them (e.g. merge.r_h=null merge.r_w=null)"
            )
        if by_r and (self.r_h is None or self.r_w is None):
            raise ValueError(
                f"stage at loc={self.loc} sets r_h={self.r_h}, r_w={self.r_w}: set both, or a ratio"
            )
        if not by_r and self.ratio is None:
            raise ValueError(f"stage at loc={self.loc} needs r_h and r_w, or a ratio")
        if self.ratio is not None:
            check_ratio(self.ratio)

    def removal(self, hw: tuple[int, int], window: int | None, align: str) -> tuple[int, int]:
        """(r_h, r_w) for a grid of size ``hw`` (ratios resolve per axis, optionally aligned)."""
        if self.ratio is None:
            return int(self.r_h), int(self.r_w)
        if align == "window":
            assert window is not None
            removal = window_aligned_r(hw, self.ratio, window)
        else:
            removal = ratio_to_r(hw, self.ratio)
        if removal == (0, 0) and self.ratio > 0:
            how = f"with align=window (windows of {window}) " if align == "window" else ""
            raise ValueError(
                f"ratio={self.ratio} {how}on the {hw[0]}x{hw[1]} grid at loc={self.loc} rounds to "
                "r_h=r_w=0: nothing would be merged, yet the run would be reported as merged; "
                f"use a larger ratio (more than {0.5 / max(hw):.3g} per axis, e.g. {1 / max(hw):.3g}"
                + (f", or enough to reach a multiple of {window}" if align == "window" else "")
                + ") or set r_h/r_w"
            )
        return removal


def _as_stage(item: Any) -> Stage:
    if isinstance(item, Stage):
        return item
    if isinstance(item, dict) or hasattr(item, "keys"):
        return Stage(**dict(item))
    values = list(item)
    if len(values) == 3:
        return Stage(*values)
    if len(values) == 2:
        return Stage(values[0], ratio=values[1])
    raise ValueError(f"stage {item!r} must be (loc, r_h, r_w), (loc, ratio) or a dict of those keys")


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge request. Build it with ``MergeConfig.create``."""

    method: str = "none"
    stages: tuple[Stage, ...] = ()
    r: int | tuple[int, float] | list[int] | None = None  # faithful per-layer ToMe schedule
    align: str = "none"
    reduce: str = "maxmag"
    collisions: str = "exact"
    metric: str = "tokens"
    positions: str = "grid"
    recover: bool = False
    # Proportional attention: log(cell size) added to the attention logits of every merged key.
    prop_attn: bool = False
    # Expedite only: the options the user set; ``None`` values take the backbone's reference
    # defaults when the model is patched (``with_defaults``).
    expedite: dict[str, Any] = field(default_factory=dict)

    @property
    def per_layer(self) -> bool:
        """Faithful ToMe: merge r tokens in every block rather than once on the grid."""
        return self.method == "tome" and not self.stages

    @classmethod
    def create(
        cls,
        method: str = "cubist",
        *,
        loc: int | None = None,
        r_h: int | None = None,
        r_w: int | None = None,
        ratio: float | None = None,
        stages: Sequence[Any] | None = None,
        r: int | Sequence[int] | None = None,
        align: str = "none",
        reduce: str = "maxmag",
        collisions: str = "exact",
        metric: str = "tokens",
        positions: str = "grid",
        recover: bool = False,
        prop_attn: bool | None = None,
        n_iters: int | None = None,
        temperature: float | str | None = None,
        window_size: int | None = None,
        k: int | None = None,
        reconstruct: str | None = None,
        windowed: bool | None = None,
    ) -> "MergeConfig":
        """Validate keyword arguments as ``spatialmerge.patch`` takes them.

        Grid methods (cubist, expedite, oracle, pool, single-layer tome) take ``loc`` with
        ``r_h``/``r_w`` or ``ratio``, or ``stages``; faithful ToMe takes ``r`` (int,
        (r, inflection) or a list).

        Expedite options left None take the backbone's reference defaults when patching: ViT /
        DeiT / DINOv3 the CubistMerge authors' DINOv3 port (global clustering, 5 iterations,
        temperature 0.01, cluster window 5, k 20), SAM Expedit-SAM's (each 14x14 window
        clustered separately, later window blocks at the reduced window, 3 iterations,
        temperature 0.1, cluster window 5, k 36); both reconstruct with L2-normalised weights.
        ``temperature="auto"`` is the scale-free calibrated form.

        ``prop_attn`` (ToMe's proportional attention): later blocks add log(size) to the
        attention logits of each key, size being the number of original patches the token
        covers (prefix tokens and window padding: size 1, no bias). None takes the method's
        own default: on for per-layer ToMe (as ToMe), off for every grid merge (the paper's
        CubistMerge and the baselines as published).
        """
        check_choice("method", method, METHODS)
        check_choice("align", align, ALIGNS)
        check_choice("reduce", reduce, REDUCE_RULES)
        check_choice("collisions", collisions, COLLISION_RULES)
        check_choice("metric", metric, METRICS)
        check_choice("positions", positions, POSITIONS)
        single = loc is not None or r_h is not None or r_w is not None or ratio is not None
        if stages and single:
            raise ValueError("give either stages=[...] or loc with r_h/r_w or ratio, not both")
        if not isinstance(recover, bool):
            raise ValueError(f"recover={recover!r} must be true or false")
        if prop_attn is not None and not isinstance(prop_attn, bool):
            raise ValueError(
                f"prop_attn={prop_attn!r} must be true, false or null (the method's default: on "
                "for per-layer ToMe, off for grid merges)"
            )
        if method == "none":
            return cls()
        if r is not None:
            if method != "tome" or stages or single:
                raise ValueError(
                    f"r={r!r} is faithful ToMe's per-layer schedule: use it with method='tome' "
                    "and no loc/ratio/stages (those describe a single merge on the grid)"
                )
            # A tuple is ToMe's (r, inflection); any other sequence is a per-layer list.
            schedule = r if isinstance(r, (int, tuple)) else [int(v) for v in r]
            parse_r(max(len(schedule), 1) if isinstance(schedule, list) else 2, schedule)
            return cls(
                method=method, r=schedule, metric=metric, recover=recover,
                prop_attn=default_prop_attn(method, True) if prop_attn is None else prop_attn,
            )
        if stages:
            parsed = tuple(_as_stage(item) for item in stages)
        elif single:
            if loc is None:
                raise ValueError(f"{method} needs loc (the block index to merge before), e.g. loc=3")
            parsed = (Stage(loc, r_h, r_w, ratio),)  # Stage checks loc: 1.5 or True is no block
        else:
            raise ValueError(
                f"{method} needs a schedule: loc with r_h and r_w or ratio, or stages=[...]"
                + (", or r=<tokens per layer> for per-layer ToMe" if method == "tome" else "")
            )
        locs = [stage.loc for stage in parsed]
        if any(b <= a for a, b in zip(locs, locs[1:])):
            raise ValueError(f"stage locations {locs} must be strictly increasing")
        if method != "cubist" and len(parsed) > 1:
            raise ValueError(f"{method} merges once; several stages are supported for cubist only")
        if method == "expedite" and metric != "tokens":
            raise ValueError(f"metric={metric!r}: expedite clusters the tokens themselves; use metric=tokens")
        if method in ("oracle", "pool") and metric != "tokens":
            raise ValueError(f"metric={metric!r} is not used by method={method!r}, which matches nothing; drop it")
        if method != "cubist":
            unused = [f"{k}={v!r}" for k, v, default in (("reduce", reduce, "maxmag"), ("collisions", collisions, "exact"))
                      if v != default]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)}: CubistMerge options, not used by method={method!r}; drop "
                    f"{'it' if len(unused) == 1 else 'them'} or use method=cubist"
                )
        expedite = dict(
            n_iters=n_iters, temperature=temperature, window_size=window_size, k=k,
            reconstruct=reconstruct, windowed=windowed,
        )
        if method == "expedite":
            if reconstruct is not None:
                check_choice("reconstruct", reconstruct, RECONSTRUCT_RULES)
            if windowed is not None and not isinstance(windowed, bool):
                raise ValueError(f"windowed={windowed!r} must be true, false or null (the backbone's default)")
        else:
            given = [key for key, value in expedite.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} {'is an' if len(given) == 1 else 'are'} Expedite "
                    f"option{'s' if len(given) > 1 else ''}, not used by method={method!r}; "
                    "drop it or use method=expedite"
                )
        return cls(
            method=method,
            stages=parsed,
            align=align,
            reduce=reduce,
            collisions=collisions,
            metric=metric,
            positions=positions,
            recover=recover,
            prop_attn=default_prop_attn(method, False) if prop_attn is None else prop_attn,
            expedite=expedite if method == "expedite" else {},
        )

    def with_defaults(self, expedite_defaults: dict[str, Any]) -> "MergeConfig":
        """This config with every unset Expedite option taken from ``expedite_defaults``."""
        if self.method != "expedite":
            return self
        filled = {
            key: expedite_defaults[key] if self.expedite.get(key) is None else self.expedite[key]
            for key in EXPEDITE_KEYS
        }
        return replace(self, expedite=filled)

    @property
    def windowed(self) -> bool:
        """Expedite clusters each attention window separately (Expedit-SAM)."""
        return bool(self.expedite.get("windowed"))

    def grid_options(self) -> dict[str, Any]:
        """Options for ``reduce_grid`` of this config's method."""
        if self.method == "cubist":
            return {"reduce": self.reduce, "collisions": self.collisions}
        return {key: value for key, value in self.expedite.items() if key != "windowed"}
