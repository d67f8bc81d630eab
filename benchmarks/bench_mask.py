"""How long an N:M mask takes, measured against one elementwise pass (``w.abs()``) over the same weight.

Target: at 1:16 on a 4096x4096 fp32 weight, the per-forward mask (``nmflow.core.masks.compute_mask``)
costs no more than 3 elementwise passes. Candidates, timed round-robin on the same weight so that
machine drift hits them alike (medians over the repetitions):

* ``abs``:          ``w.abs()``, the unit of the ratios;
* ``compute_mask``: nmflow's hot path, run by every forward of a sparsified layer;
* ``nm_mask``:      the public function: adds argument checks and an isfinite scan;
* ``official``:     the official PGF code's approach (argsort per group, float mask; see official_baseline.py).

Layouts: ``Linear`` ([out, in], groups along dim 1) and GPT-2 ``Conv1D`` ([in, out], groups along dim 0).

    python benchmarks/bench_mask.py                # 4096x4096, 2:4 1:8 1:16 1:32, fp32 and bf16
    python benchmarks/bench_mask.py --quick        # smoke test in a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from official_baseline import official_mask

from nmflow import NMPattern, nm_mask
from nmflow.core.masks import compute_mask

LAYOUTS = {"Linear": 1, "Conv1D": 0}  # layout name -> dim along which groups run
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_RATIO = 3.0  # compute_mask at 1:16, fp32, vs one elementwise pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (default 4096)")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds per table row (default 11)")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:8", "1:16", "1:32"], help="N:M patterns")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="512x512, 3 repeats: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 512, 3
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each candidate; one warm-up call each, then ``repeats`` round-robin rounds."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for run in candidates.values():
        run()
    for _ in range(repeats):
        for name, run in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(samples) for name, samples in times.items()}


def candidates(weight: torch.Tensor, pattern: NMPattern, dim: int) -> dict[str, Callable[[], object]]:
    n, m = pattern.n, pattern.m
    return {
        "abs": weight.abs,
        "compute_mask": lambda: compute_mask(weight, pattern, dim),
        "nm_mask": lambda: nm_mask(weight, n, m, dim),
        "official": lambda: official_mask(weight, n, m, dim),
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patterns = [NMPattern.parse(p) for p in args.patterns]
    print(
        f"N:M mask vs one elementwise pass (w.abs()), {args.size}x{args.size} weight, device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} round-robin runs"
    )
    header = f"{'dtype':5} {'layout':7} {'N:M':>5} {'abs ms':>8}"
    for name in ("compute_mask", "nm_mask", "official"):
        header += f" {name + ' ms':>16} {'x abs':>6}"
    print(header)
    print("-" * len(header))

    generator = torch.Generator().manual_seed(0)
    weight_fp32 = torch.randn(args.size, args.size, generator=generator)
    target_ratio = None
    for dtype_name, dtype in DTYPES.items():
        weight = weight_fp32.to(device=device, dtype=dtype)
        for layout, dim in LAYOUTS.items():
            for p in patterns:
                ms = median_ms(candidates(weight, p, dim), args.repeats, device)
                row = f"{dtype_name:5} {layout:7} {str(p):>5} {ms['abs']:8.2f}"
                for name in ("compute_mask", "nm_mask", "official"):
                    row += f" {ms[name]:16.2f} {ms[name] / ms['abs']:6.2f}"
                print(row, flush=True)
                if (dtype_name, layout, p) == ("fp32", "Linear", NMPattern(1, 16)):
                    target_ratio = ms["compute_mask"] / ms["abs"]

    if target_ratio is not None:
        verdict = "met" if target_ratio <= TARGET_RATIO else "NOT met"
        print(
            f"\ntarget: compute_mask at 1:16, fp32, Linear <= {TARGET_RATIO:g}x abs: "
            f"{target_ratio:.2f}x at {args.size}x{args.size} ({verdict})"
        )


if __name__ == "__main__":
    main()
