"""Claim (d) side by side: SR-STE given mdgf-exp's training FLOPs against mdgf-exp and 400-step SR-STE.

Reads the finished runs of two sweeps (experiments/paper-small.yaml and experiments/isoflops.yaml) and prints,
per pattern, training FLOPs and test/validation perplexity (mean +- std over seeds), and the same-seed paired
difference of test perplexity (iso-FLOPs SR-STE minus mdgf-exp).

    python experiments/compare_isoflops.py docs/results/paper-small docs/results/isoflops
"""

from __future__ import annotations

import argparse
import statistics

from nmflow.app.report import collect_runs


def _stats(values: list[float], digits: int = 2) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paper_small")
    parser.add_argument("isoflops")
    args = parser.parse_args()
    runs = [
        run
        for folder in (args.paper_small, args.isoflops)
        for run in collect_runs(folder)
        if run.status == "finished" and run.get("task") == "language" and not run.get("init_from")
    ]
    paired = []
    print("| pattern | method | steps | training FLOPs | test perplexity | validation perplexity | seeds |")
    print("|---|---|---|---|---|---|---|")
    for pattern in ("1:16", "1:32"):
        rows: dict[tuple[str, int], dict[int, dict]] = {}  # (method, steps) -> seed -> summary
        for run in runs:
            if run.summary["sparsity"].get("ff") == pattern and run.method in ("srste", "mdgf-exp"):
                rows.setdefault((run.method, run.summary["steps"]), {})[run.summary["seed"]] = run.summary
        for (method, steps), by_seed in sorted(rows.items()):
            summaries = list(by_seed.values())
            flops = statistics.mean(s["training_flops"] for s in summaries)
            print(
                f"| {pattern} | {method} | {steps} | {flops:.3g} | "
                f"{_stats([s['test_perplexity'] for s in summaries])} | "
                f"{_stats([s['val_perplexity'] for s in summaries])} | {len(summaries)} |"
            )
        mdgf_steps = [steps for method, steps in rows if method == "mdgf-exp"]
        srste_steps = [steps for method, steps in rows if method == "srste"]
        if not mdgf_steps or not srste_steps:
            continue
        # SR-STE with the most steps (the iso-FLOPs run) against MDGF-exp
        iso, mdgf = rows["srste", max(srste_steps)], rows["mdgf-exp", min(mdgf_steps)]
        seeds = sorted(iso.keys() & mdgf.keys())
        if seeds:
            diffs = [iso[s]["test_perplexity"] - mdgf[s]["test_perplexity"] for s in seeds]
            paired.append(f"{pattern}: {_stats(diffs)} (seeds {seeds})")
    print("\nIso-FLOPs SR-STE minus mdgf-exp, test perplexity, paired by seed:")
    print("\n".join(paired) or "no seed has both runs")


if __name__ == "__main__":
    main()
