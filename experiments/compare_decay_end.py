"""MDGF's decay end side by side: the default since nmflow 0.2 (ending at 30% of the run) against 0.1's 70%.

Pairs, by task, pattern, method and seed, the MDGF runs of two sweep folders that differ only in the decay
(experiments/paper-small.yaml sets decay_end_fraction 0.7; experiments/decay-end-check.yaml keeps the default)
and prints validation loss and the validation and test scores: mean ± std of the 70% runs, and the same-seed
difference, 30% minus 70%. Choose on validation; the test column is shown, not used to choose.

    python experiments/compare_decay_end.py docs/results/paper-small docs/results/decay-end-check
"""

from __future__ import annotations

import argparse
import statistics

from nmflow.app.report import collect_runs

SCORES = {"accuracy": ("accuracy", 100.0), "perplexity": ("perplexity", 1.0)}  # summary key suffix, scale


def _stats(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.{digits}f} ± {spread:.{digits}f}"


def _column(pairs: list[tuple[dict, dict]], key: str, scale: float, digits: int) -> tuple[str, str]:
    """The 70% runs' mean ± std of ``key``, and the paired difference (30% minus 70%)."""
    before = [old[key] * scale for old, _ in pairs]
    diffs = [(new[key] - old[key]) * scale for old, new in pairs]
    return _stats(before, digits).lstrip("+"), _stats(diffs, digits)


def _mdgf_runs(folder: str) -> dict[tuple[str, str, str, int], dict]:
    """(task, ff pattern, method, seed) -> summary of the finished MDGF runs trained from scratch."""
    found = {}
    for run in collect_runs(folder):
        if run.status == "finished" and run.method.startswith("mdgf") and not run.get("init_from"):
            summary = run.summary
            key = (summary["task"], summary["sparsity"].get("ff", "?"), run.method, summary["seed"])
            found[key] = summary
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("end_70", help="runs with the decay ending at 70%% (paper-small)")
    parser.add_argument("end_30", help="the same runs with the default decay (decay-end-check)")
    args = parser.parse_args()
    old, new = _mdgf_runs(args.end_70), _mdgf_runs(args.end_30)
    groups: dict[tuple[str, str, str], list[int]] = {}
    for key in sorted(old.keys() & new.keys(), key=lambda k: (k[0], int(k[1].split(":")[1]), k[2], k[3])):
        groups.setdefault(key[:3], []).append(key[3])

    header = ["task", "pattern", "method", "val loss (70%)", "Δ val loss", "lower on", "val (70%)", "Δ val", "Δ test"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for (task, pattern, method), seeds in groups.items():
        pairs = [(old[task, pattern, method, s], new[task, pattern, method, s]) for s in seeds]
        suffix, scale = SCORES[pairs[0][0]["metric"]]
        loss, loss_diff = _column(pairs, "val_loss", 1.0, 3)
        lower = sum(new["val_loss"] < old["val_loss"] for old, new in pairs)
        val, val_diff = _column(pairs, f"val_{suffix}", scale, 2)
        _, test_diff = _column(pairs, f"test_{suffix}", scale, 2)
        cells = [task, pattern, method, loss, loss_diff, f"{lower} of {len(seeds)} seeds", f"{val} {suffix}"]
        print("| " + " | ".join([*cells, val_diff, test_diff]) + " |")
    print("\nΔ: the default (decay ending at 30%) minus the 70% end, same seed; mean ± std over seeds.")
    print("Lower loss and perplexity are better, higher accuracy is better; 'lower on': the seeds on which the")
    print("default's validation loss is the lower one.")


if __name__ == "__main__":
    main()
