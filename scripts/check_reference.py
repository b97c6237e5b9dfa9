"""Check the ToMe and Expedite baselines against their authors' code (no weights needed).

    python scripts/check_reference.py --tome ~/src/ToMe                 # a facebookresearch/ToMe checkout
    python scripts/check_reference.py --expedit ~/src/Expedit-SAM       # an Expedit-SAM checkout
    python scripts/check_reference.py --tome ~/src/ToMe --expedit ~/src/Expedit-SAM --atol 1e-5

Runs the reference functions beside spatialmerge's on seeded random inputs (CPU, float32) and
prints the maximum absolute difference of each comparison; exits 1 if any exceeds --atol. A
comparison that cannot run (e.g. ToMe's timm patch against the installed timm) is printed as
SKIP with the reason, counted at the end, and does not fail the run.

ToMe: matching + size-weighted merge with 0, 1 (class token) and 2 (class + distillation)
prefix tokens, unmerge, and per-layer ToMe on small random-init timm DeiTs (their
``apply_patch`` on a deep copy vs ``spatialmerge.patch(model, "tome", r=...)``, logits).

Expedite: Expedit-SAM's ``TokenClusteringBlock`` / ``TokenReconstructionBlock`` vs
``expedite_cluster`` / ``expedite_reconstruct`` on a (B, H, W, C) grid. spatialmerge documents
two departures from them; the settings here keep both out of play: a fixed temperature (never
"auto"), and unit-variance features at a temperature where every affinity stays far from
float32 underflow, so every centroid receives tokens (the "dead centroid keeps its value" rule
never fires) and the reconstruction weights never underflow either.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import timm
import torch
from torch import Tensor

import spatialmerge
from spatialmerge.merging.expedite import expedite_cluster, expedite_reconstruct
from spatialmerge.merging.tome import bipartite_soft_matching, merge_wavg


class Report:
    """Prints one line per comparison and remembers mismatches and skips for the summary."""

    def __init__(self, atol: float) -> None:
        self.atol = atol
        self.count = 0
        self.mismatches: list[str] = []
        self.skips: list[str] = []

    def diff(self, name: str, ours: Tensor, theirs: Tensor) -> None:
        self.count += 1
        if ours.shape != theirs.shape:
            self._fail(name, f"shapes differ: ours {tuple(ours.shape)}, theirs {tuple(theirs.shape)}")
            return
        err = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
        if err > self.atol:
            self._fail(name, f"max |diff| = {err:.2e} > atol {self.atol:.0e}")
        else:
            print(f"ok        {name}: max |diff| = {err:.2e}")

    def skip(self, name: str, why: str) -> None:
        self.skips.append(name)
        print(f"SKIP      {name}: could not run ({why})")

    def _fail(self, name: str, detail: str) -> None:
        self.mismatches.append(name)
        print(f"MISMATCH  {name}: {detail}")


def stub_package(name: str, folder: Path | list[str]) -> None:
    """Register an empty package whose submodules load from `folder`, without running its
    __init__.py (and its imports of everything else)."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)] if isinstance(folder, Path) else folder
    sys.modules[name] = package


def load_tome(root: Path) -> types.ModuleType:
    # tome/__init__.py imports vis.py and tome/patch/__init__.py the swag and mae patches; none
    # is compared here, and their extra dependencies should not decide whether this check runs
    stub_package("tome", root / "tome")
    stub_package("tome.patch", root / "tome" / "patch")
    return importlib.import_module("tome.merge")


def load_expedit(path: Path) -> types.ModuleType:
    # The file's relative imports (.common, .image_encoder) resolve inside a private package over
    # the checkout's modeling/ folder: importing segment_anything itself would build whole SAM
    # models and shadow (or be shadowed by) an installed segment-anything. The installed one's
    # modeling/ is a fallback for partial checkouts; it only serves HourglassImageEncoderViT.
    folders = [str(path.parent)]
    installed = importlib.util.find_spec("segment_anything")
    if installed is not None and installed.submodule_search_locations:
        folders += [str(Path(p) / "modeling") for p in installed.submodule_search_locations]
    stub_package("_expedit_ref", folders)
    return importlib.import_module("_expedit_ref." + path.stem)


def check_tome_matching(their: types.ModuleType, report: Report, gen: torch.Generator) -> None:
    batch, tokens, r = 2, 49, 12  # odd N: set A has one token more than set B
    for prefix in (0, 1, 2):
        metric = torch.randn(batch, tokens, 16, generator=gen)
        x = torch.randn(batch, tokens, 32, generator=gen)
        # sizes above 1, as after earlier merges, so the weighting is exercised
        size = torch.randint(1, 5, (batch, tokens, 1), generator=gen).float()
        # ToMe protects a class token (1 prefix) and a distillation token after it (2 prefixes)
        t_merge, t_unmerge = their.bipartite_soft_matching(metric, r, prefix >= 1, prefix == 2)
        o_merge, o_unmerge = bipartite_soft_matching(metric, r, prefix)
        t_x, t_size = their.merge_wavg(t_merge, x, size)
        o_x, o_size = merge_wavg(o_merge, x, size)
        report.diff(f"tome merge_wavg features, {prefix} prefix", o_x, t_x)
        report.diff(f"tome merge_wavg sizes, {prefix} prefix", o_size, t_size)
        report.diff(f"tome merge (mean), {prefix} prefix", o_merge(x), t_merge(x))

        y = torch.randn(batch, tokens - r, 32, generator=gen)
        t_y = y
        if prefix == 2:
            # ToMe's merge writes [cls, dist, unmerged A, B] with a distillation token, but its
            # unmerge always reads [unmerged A (cls first), B (dist first)]; feed it that order
            num_unm = (tokens + 1) // 2 - r
            t_y = torch.cat([y[:, :1], y[:, 2 : 1 + num_unm], y[:, 1:2], y[:, 1 + num_unm :]], 1)
        report.diff(f"tome unmerge, {prefix} prefix", o_unmerge(y), t_unmerge(t_y))


def check_tome_timm(report: Report, gen: torch.Generator) -> None:
    images = torch.randn(2, 3, 96, 96, generator=gen)  # 6x6 patches
    for arch in ("deit_small_patch16_224", "deit_tiny_distilled_patch16_224"):
        for r in (4, (6, -1.0)):  # constant and ToMe's decreasing schedule
            name = f"tome timm {arch} (depth 4, 96 px), r={r}: logits"
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, depth=4, num_classes=10, img_size=96).eval()
            theirs = copy.deepcopy(model)
            spatialmerge.patch(model, "tome", r=r)
            with torch.no_grad():
                ours = model(images)
                try:
                    # imported here: tome/patch/timm.py imports timm names at module level
                    importlib.import_module("tome.patch.timm").apply_patch(theirs)
                    theirs.r = r
                    ref = theirs(images)
                except Exception as err:  # the reference was written for an older timm
                    report.skip(name, f"ToMe's timm patch failed on timm {timm.__version__}: "
                                f"{type(err).__name__}: {err}")
                    continue
            report.diff(name, ours, ref)


def check_expedit(their: types.ModuleType, report: Report, gen: torch.Generator) -> None:
    # (H, W) -> (H', W'): one grid the centroids divide evenly, one they do not
    cases = [((16, 12), (8, 6), 3), ((14, 14), (5, 5), 5)]
    temperature, n_iters, k = 0.05, 5, 5
    for (h, w), (out_h, out_w), window in cases:
        label = f"{h}x{w} -> {out_h}x{out_w}, window {window}"
        x = torch.randn(2, h, w, 8, generator=gen)
        block = their.TokenClusteringBlock(num_spixels=(out_h, out_w), n_iters=n_iters,
                                           temperture=temperature, window_size=window)
        t_cent, t_labels = block(x)
        o_cent, record = expedite_cluster(x, (out_h, out_w), n_iters=n_iters,
                                          temperature=temperature, window_size=window, k=k)
        report.diff(f"expedite cluster centroids, {label}", o_cent, t_cent)
        report.diff(f"expedite cluster hard labels, {label}", record.labels, t_labels)

        # the reconstruction mixes whatever the later blocks made of the centroids: a new grid
        y = torch.randn(2, out_h, out_w, 8, generator=gen)
        state = their.TokenReconstructionBlock(k=k, temperture=temperature).derive_unpooler()
        state.update_state(feat_before_pooling=x.reshape(2, h * w, 8),
                           feat_after_pooling=t_cent.reshape(2, out_h * out_w, 8))
        t_full, _ = state.call(y.reshape(2, out_h * out_w, 8))
        o_full = expedite_reconstruct(y, record)
        report.diff(f"expedite reconstruct, {label}", o_full, t_full.reshape(2, h, w, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tome", type=Path, help="root of a facebookresearch/ToMe checkout")
    parser.add_argument("--expedit", type=Path, help="root of an Expedit-SAM checkout")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest absolute difference that passes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tome is None and args.expedit is None:
        parser.error("nothing to check; pass --tome PATH and/or --expedit PATH")
    if not args.atol >= 0:
        parser.error(f"--atol {args.atol} must be >= 0")
    if args.tome is not None and not (args.tome / "tome" / "merge.py").is_file():
        parser.error(f"--tome {args.tome}: no tome/merge.py there; pass the root of a facebookresearch/ToMe checkout")
    hourglass = None
    if args.expedit is not None:
        hourglass = args.expedit / "segment_anything" / "modeling" / "hourglass_image_encoder.py"
        if not hourglass.is_file():
            parser.error(f"--expedit {args.expedit}: no segment_anything/modeling/hourglass_image_encoder.py "
                         "there; pass the root of an Expedit-SAM checkout")

    report = Report(args.atol)
    gen = torch.Generator().manual_seed(args.seed)
    if args.tome is not None:
        their_merge = load_tome(args.tome.resolve())
        print(f"ToMe reference: {their_merge.__file__}")
        check_tome_matching(their_merge, report, gen)
        check_tome_timm(report, gen)
    if hourglass is not None:
        their_expedit = load_expedit(hourglass.resolve())
        print(f"Expedit reference: {their_expedit.__file__}")
        check_expedit(their_expedit, report, gen)

    print(f"\n{report.count} comparisons, atol {args.atol:.0e}: {len(report.mismatches)} mismatched, "
          f"{len(report.skips)} skipped")
    if report.skips:
        print(f"skipped (could not run; not counted as failures): {', '.join(report.skips)}")
    if report.mismatches:
        print(f"mismatched: {', '.join(report.mismatches)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
