"""Benchmark merge schedules against their zero-cost limit (no weights needed).

    python scripts/benchmark.py                          # SAM-B, SAM 2 B+, DeiT-B, DINOv3-B on CPU, fp32
    python scripts/benchmark.py --suites sam_b --iters 5
    python scripts/benchmark.py --device cuda --dtype fp16
    python scripts/benchmark.py --tiny --iters 1         # tiny models: checks the script runs

Prints a markdown table and writes it, with the setup, to --out (JSON; by default a new
logs/benchmark/<time>/benchmark.json; an existing file is never overwritten).
"""

import argparse
import os
import platform
import shlex
import time
from pathlib import Path

import torch

from spatialmerge import project_root
from spatialmerge.distributed import resolve_device
from spatialmerge.evaluators.benchmark import default_suites, format_rows, run_suite
from spatialmerge.results import environment, new_run_dir, write_json_atomic


def replay_command(args: argparse.Namespace) -> str:
    """The command line that runs this benchmark again: flags as the parser takes them
    (``--tiny``, not ``--tiny True``), the output file included."""
    parts = ["python", "scripts/benchmark.py"]
    for key, value in vars(args).items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            parts.append(flag)
        elif value not in (None, False):
            parts += [flag, str(value)]
    return shlex.join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--suites", default="sam_b,sam2_b+,deit_b,dinov3_b", help="comma-separated: sam_b, sam2_b+, deit_b, dinov3_b"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--batch-size", type=int, default=None, help="override every suite's batch size")
    parser.add_argument("--tiny", action="store_true", help="tiny random architectures (seconds, for checks)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default: logs/benchmark/<time>/benchmark.json of the project root, "
                             "SPATIALMERGE_ROOT if set); never overwritten")
    args = parser.parse_args()
    for name in ("warmup", "iters", "batch_size"):
        value, low = getattr(args, name), 0 if name == "warmup" else 1
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} {value} must be >= {low}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err).replace("device=", "--device "))
    if args.dtype != "fp32" and device.type != "cuda":
        parser.error(f"--dtype {args.dtype} is CUDA autocast; on {device.type} use --dtype fp32")

    root = Path(os.environ.get("SPATIALMERGE_ROOT") or project_root())
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists; a benchmark never overwrites a file: choose another --out")
    suites = default_suites(tiny=args.tiny, batch_size=args.batch_size)
    chosen = [name.strip() for name in args.suites.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(suites))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(suites)}")
    out = args.out or new_run_dir(root / "logs", "benchmark") / "benchmark.json"
    rows = []
    for name in chosen:
        print(f"benchmarking {name} ({len(suites[name].schedules)} schedules) ...", flush=True)
        rows.extend(run_suite(suites[name], args.device, args.dtype, args.warmup, args.iters))
    table = format_rows(rows)
    noisy = [f"{row['suite']} {row['variant']}" for row in rows if row["noisy"]]
    setup = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": replay_command(args),
        "device": args.device,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "iters": args.iters,
        "tiny": args.tiny,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"setup": setup, "environment": environment(args.device), "rows": rows})
    print(table)
    if noisy:
        print(f"warning: noisy timings (see 'noise' in {out}): {', '.join(noisy)}; benchmark on an idle "
              "machine or raise --iters")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
