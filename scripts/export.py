"""Export a merged encoder to ONNX (or a torch.export program), check it against the eager
model, and time onnxruntime merged against onnxruntime unmerged.

    python scripts/export.py                                   # trained DINOv2-S/14, cubist, 448 px
    python scripts/export.py model=sam_b_random merge.loc=3 merge.ratio=0.25
    python scripts/export.py model=deit_t model.checkpoint=null merge=tome merge.r=8
    python scripts/export.py merge=cubist merge.ratio=0.25 --format export --out dino.pt2

Takes eval.py's overrides (composed from configs/eval.yaml). Writes the merged encoder (SAM:
the image encoder SamPredictor runs; SAM 2: trunk + neck; ViT / DINOv2 / DINOv3 / DeiT /
transformers models: their forward) and prints the largest difference between the file's
outputs and the eager merged model's on the same seeded input. For ONNX it also exports the
unmerged encoder and times both sessions alternately, one of each per round: the speed-up is
the median of per-round ratios with its interquartile range, as eval.py reports it.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spatialmerge import export as deploy  # noqa: E402
from spatialmerge.adapters import find_adapter  # noqa: E402
from spatialmerge.evaluators.timing import host_load, machine_load, speedup_text, summarise_rounds  # noqa: E402
from spatialmerge.pipeline import instantiate, resolve_merge  # noqa: E402
from spatialmerge.results import new_run_dir, refuse_existing  # noqa: E402

import spatialmerge  # noqa: E402


def unmerged_onnx(out: Path) -> Path:
    """Where the unmerged encoder, exported for the timing, goes: beside ``out``."""
    return out.with_name(out.stem + "_unmerged" + out.suffix)


def time_rounds(runners: dict[str, object], images: torch.Tensor, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, timed alternately (one call of each per round, the
    order swapped every round so neither always runs first)."""
    for _ in range(warmup):
        for run in runners.values():
            run(images)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runners[name](images)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="eval.py overrides, e.g. model=sam_b_random merge.ratio=0.25")
    parser.add_argument("--format", default="onnx", choices=deploy.FORMATS,
                        help="onnx (onnxruntime) or export (a torch.export .pt2 program)")
    parser.add_argument("--out", type=Path, default=None,
                        help="file to write (default: <paths.log_dir>/export/<time>/encoder.onnx or .pt2, logs/ of the "
                             "checkout); never overwritten")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds, one call of each per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each before the rounds")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference to the eager model accepted (exit 1 above it)")
    args = parser.parse_args(argv)
    try:
        if args.rounds < 1 or args.warmup < 0:
            raise ValueError(f"--rounds={args.rounds} must be >= 1 and --warmup={args.warmup} >= 0")
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=args.overrides)
        if args.out is not None:
            refuse_existing(args.out, "an export")
            if args.format == "onnx":  # the unmerged encoder it is timed against goes beside it
                refuse_existing(unmerged_onnx(args.out), "an export")
        torch.manual_seed(cfg.seed)
        model = instantiate(cfg.model).eval()
        schedule = resolve_merge(model, cfg.merge)
        if schedule is None:
            raise ValueError("merge=none exports nothing merged; choose a method, e.g. merge=cubist")
        deploy.check_exportable(model, args.format)
        images = torch.randn(1, *find_adapter(model).input_size(model), generator=torch.Generator().manual_seed(0))
        unmerged = copy.deepcopy(model)  # before any tracing: a traced model holds fake tensors
        merged = spatialmerge.patch(model, **schedule.options)
        out = args.out or new_run_dir(cfg.paths.log_dir, "export") / ("encoder" + deploy.SUFFIX[args.format])
        print(f"model: {cfg.model.name}   merge: {schedule.label()}")
        expected = deploy.eager_outputs(merged, images)
        deploy.export(merged, images, out, args.format)
        runner = deploy.OnnxRunner(out) if args.format == "onnx" else deploy.load_program(out)
        difference = deploy.max_difference(expected, deploy.outputs(runner, images))
        print(f"wrote {out}: max |exported - eager| = {difference:.2e} (tolerance {args.tolerance:g})")
        if difference > args.tolerance:
            print(f"error: the exported file differs from the eager model by {difference:.2e}", file=sys.stderr)
            return 1
        if args.format == "onnx":
            unmerged_path = unmerged_onnx(out)
            deploy.export(unmerged, images, unmerged_path, "onnx")
            eager_merged, eager_unmerged = (deploy.Exported(deploy.export_target(m)).eval() for m in (merged, unmerged))
            runners = {"onnxruntime unmerged": deploy.OnnxRunner(unmerged_path), "onnxruntime merged": runner,
                       "eager unmerged": torch.no_grad()(eager_unmerged), "eager merged": torch.no_grad()(eager_merged)}
            before = machine_load()
            seconds = time_rounds(runners, images, args.rounds, args.warmup)
            busy = host_load({"before": before, "after": machine_load()}, "cpu")
            print(f"timed alternately on CPU, batch 1, {args.rounds} rounds (ms: median round; speed-up: "
                  "median of per-round ratios against the same runtime unmerged, IQR):")
            for runtime in ("onnxruntime", "eager"):
                base = seconds[f"{runtime} unmerged"]
                row = summarise_rounds(base, seconds[f"{runtime} merged"], images.shape[0], busy)
                unmerged_ms = summarise_rounds(base, base, images.shape[0], is_baseline=True)["ms_per_batch"]
                print(f"  {runtime:<12} unmerged {unmerged_ms:8.1f} ms   merged {row['ms_per_batch']:8.1f} ms   "
                      f"speed-up {speedup_text(row)}")
                for reason in row["noise"]:
                    print(f"  warning: noisy {runtime} timing: {reason}")
    except (HydraException, OSError, ValueError, TypeError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
