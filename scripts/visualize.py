"""Draw which original patches each merged token holds, for several methods side by side.

    python scripts/visualize.py                          # trained DINOv2 ViT-S/14 on skimage's astronaut
    python scripts/visualize.py photo.jpg merge.loc=3 merge.ratio=0.25 --fidelity --out merges.png
    python scripts/visualize.py photo.jpg model=sam_b_random merge.loc=3 merge.ratio=0.25
    python scripts/visualize.py photo.jpg model=sam_b model.checkpoint=/path/sam_vit_b_01ec64.pth
    python scripts/visualize.py photo.jpg model=deit_s merge.loc=1 merge.ratio=null \\
        merge.r_h=2 merge.r_w=2 --methods cubist,tome

Takes eval.py's overrides (composed from configs/eval.yaml), so any model and schedule eval.py
runs can be drawn; every method gets the same schedule, i.e. the same token budget. `merge=X`
alone draws only X. The image is resized to the model's input; with random weights the merges
still show the mechanics (which patches are combined), not what a trained model would merge.
"""

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spatialmerge.data.images import load_rgb  # noqa: E402
from spatialmerge.data.photos import PHOTOS, skimage_data_dir  # noqa: E402
from spatialmerge.pipeline import instantiate, resolve_merge  # noqa: E402
from spatialmerge.reporting.pictures import merge_figure  # noqa: E402
from spatialmerge.results import new_run_dir, refuse_existing  # noqa: E402
from spatialmerge.adapters.schedule import schedule_text  # noqa: E402

DEFAULT_METHODS = ("cubist", "tome", "expedite")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, nargs="?", default=None,
                        help="any RGB image (png, jpg, ...); default: scikit-image's astronaut photo")
    parser.add_argument("overrides", nargs="*", help="eval.py overrides, e.g. model=sam_b_random merge.loc=3")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated merge configs of configs/merge/ (default: {','.join(DEFAULT_METHODS)}, "
                             "or X for merge=X), e.g. cubist,expedite_auto,pool")
    parser.add_argument("--fidelity", action="store_true",
                        help="add per-patch cosine similarity of merged+recovered vs unmerged features")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: <paths.log_dir>/visualize/<time>/<image name>_merges.png, "
                             "logs/ of the checkout); never overwritten")
    parser.add_argument("--panel-width", type=int, default=None,
                        help="draw each panel this many pixels wide (default: the model input's width)")
    parser.add_argument("--seed", type=int, default=0, help="colour seed")
    args = parser.parse_intermixed_args(argv)
    if args.image is not None and "=" in args.image.name and not args.image.exists():
        # no image given: argparse took the first override for it
        args.overrides.insert(0, str(args.image))
        args.image = None

    chosen = [o.split("=", 1)[1] for o in args.overrides if o.startswith("merge=")]
    methods = args.methods.split(",") if args.methods else chosen or list(DEFAULT_METHODS)
    shared = [o for o in args.overrides if not o.startswith("merge=")]
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=args.overrides)
            # each method with its own merge config (configs/merge/<name>.yaml, e.g. expedite_auto)
            # and the schedule overrides shared
            method_cfgs = [compose(config_name="eval", overrides=[*shared, f"merge={m}"]).merge for m in methods]
        if "none" in methods:
            raise ValueError(
                f"methods {methods}: merge=none merges nothing to draw; pick e.g. --methods cubist,tome"
            )
        if args.image is None:
            args.image = skimage_data_dir() / PHOTOS["astronaut"]
        image = load_rgb(args.image)  # 16-bit greyscale scaled, not clipped to white
        torch.manual_seed(cfg.seed)  # the same random weights, and so the same picture, every time
        model = instantiate(cfg.model).to(cfg.device)
        merges = [resolve_merge(model, method_cfg).options for method_cfg in method_cfgs]
        schedule = merges[0]
        random = cfg.model.get("checkpoint") is None
        weights = "random weights: the mechanics only" if random else "trained weights"
        title = f"{cfg.model.name} ({weights}) · merge {schedule_text(schedule)} · {args.image.name}"
        if args.out is not None:
            refuse_existing(args.out, "a picture")
            args.out.parent.mkdir(parents=True, exist_ok=True)
        out = args.out or new_run_dir(cfg.paths.log_dir, "visualize") / f"{args.image.stem}_merges.png"
        maps = merge_figure(
            model, image, merges, out, title, fidelity=args.fidelity, seed=args.seed, panel_width=args.panel_width
        )
    except (HydraException, OSError, ValueError, TypeError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for cell_map in maps:
        print(f"{cell_map.method}: {cell_map.tokens} tokens of {cell_map.labels.size}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
