"""`nmflow report`: turn a folder of runs into the paper's tables and plots (``report.md`` + ``plots/*.png``).

    nmflow report runs/sweep-1                 # writes runs/sweep-1/report.md and runs/sweep-1/plots/

A run folder is any folder below the sweep folder holding ``config.yaml`` or ``failed.json`` (``checkpoints/``
and ``tensorboard/`` are not searched). A run is *finished* when it wrote ``summary.json``, *failed* when it
wrote ``failed.json``, *incomplete* otherwise; the report lists every run that did not finish, so no crash
goes unseen. Finished runs are grouped by task, then apart for fine-tuning runs (``init_from`` set), model
overrides and step counts, since numbers from different protocols are not comparable.

From Python: ``summarize(collect_runs(folder))`` gives the tables as numbers, ``write_report(folder)`` the files.
Reading run folders lives in `runs`, the numbers and their markdown in `tables`, the figures in `plots`;
this module assembles ``report.md`` from them.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from nmflow.app.report.plots import draw_plots, pareto_frontier
from nmflow.app.report.runs import RunRecord, collect_runs, read_metrics
from nmflow.app.report.tables import (
    Cell,
    Comparison,
    Group,
    Metric,
    Table,
    diagnostics_table,
    markdown_table,
    overview_table,
    render_comparisons,
    render_table,
    summarize,
)
from nmflow.core.errors import ConfigError

__all__ = [
    "Cell",
    "Comparison",
    "Group",
    "Metric",
    "RunRecord",
    "Table",
    "collect_runs",
    "pareto_frontier",
    "read_metrics",
    "render_table",
    "summarize",
    "write_report",
]


def _unfinished_section(root: Path, runs: list[RunRecord]) -> list[str]:
    unfinished = [r for r in runs if r.status != "finished"]
    if not unfinished:
        return []
    rows = []
    for run in unfinished:
        if run.status == "failed":
            lines = [line.strip() for line in (run.error or "").splitlines() if line.strip()]
            detail = (lines[-1] if lines else "no error text") + (
                f" (exit code {run.returncode})" if run.returncode is not None else ""
            )
        else:
            train, _ = read_metrics(run.path)
            detail = f"no summary.json or failed.json; last step logged {train[-1]['step'] if train else 'none'}"
            detail += f" of {run.get('steps', '?')}"
        sparsity = run.get("sparsity") or {}
        pattern = ", ".join(f"{k}={v}" for k, v in sparsity.items()) if isinstance(sparsity, dict) else str(sparsity)
        relative = run.path.relative_to(root).as_posix() or "."
        rows.append([f"`{relative}`", run.status, run.method, pattern, str(run.get("seed", "?")), detail])
    header = ["run", "status", "method", "sparsity", "seed", "error (last line) / progress"]
    return ["## Runs that did not finish", "", *markdown_table(header, rows), ""]


def _group_section(group: Group, plots_dir: Path) -> list[str]:
    lines = [f"## {group.label}", "", f"{len(group.runs)} finished runs. Cells: mean ± sample std over seeds."]
    for table in group.tables:
        lines += ["", f"### {table.metric.title}", "", *render_table(table)]
    if group.comparisons:
        title = group.comparisons[0].metric.title
        lines += ["", f"### Best decaying recipe vs SR-STE ({title})", ""]
        note = (
            "The MDGF/SDGF recipe with the best validation mean, against SR-STE on the test split. Difference = its"
            " mean − SR-STE's mean; spread = the larger of the two seed stds."
        )
        lines += [note, ""]
        lines += render_comparisons(group.comparisons)
    diagnostics = diagnostics_table(group)
    if diagnostics:
        lines += ["", "### Gradient noise, second moment and mask flips (paper §4)", "", *diagnostics]
    lines += ["", "### Plots", ""]
    lines += draw_plots(group, plots_dir)
    return lines + [""]


def _pretraining_note(runs: list[RunRecord]) -> list[str]:
    stages = [r for r in runs if r.is_pretraining and r.status == "finished"]
    if not stages:
        return []
    steps = sorted({str(r.get("steps", "?")) for r in stages})
    note = f"{len(stages)} dense pretraining runs ({', '.join(steps)} steps) start the fine-tune groups"
    return [note + "; they are not in the tables.", ""]


def _not_started(root: Path, runs: list[RunRecord]) -> list[str]:
    """The runs the sweep spec in ``root`` plans that have no folder yet (a sweep still going, or stopped)."""
    from nmflow.app.sweep import plan_sweep, read_spec

    if not (root / "sweep.yaml").is_file():
        return []
    try:
        planned = [run.name for run in plan_sweep(read_spec(root / "sweep.yaml"))]
    except ConfigError as err:
        return ["", f"The sweep spec sweep.yaml cannot be planned ({err}); runs not started are not known."]
    present = {run.path.relative_to(root).as_posix() for run in runs}
    missing = [name for name in planned if name not in present]
    if not missing:
        return []
    return [
        "",
        f"{len(missing)} of the {len(planned)} runs of sweep.yaml have not started: "
        + ", ".join(missing[:10])
        + (", ..." if len(missing) > 10 else "")
        + ".",
    ]


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``out_dir`` (default ``runs_dir``); return the report's path."""
    root = Path(runs_dir)
    runs = collect_runs(root)
    out = Path(out_dir) if out_dir is not None else root
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    counts = Counter(r.status for r in runs)
    lines = [
        f"# Sweep report: {root.resolve().name}",
        "",
        f"{len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in ("finished", "failed", "incomplete")) + ".",
        *_not_started(root, runs),
        "",
        *_pretraining_note(runs),
        *_unfinished_section(root, runs),
    ]
    groups = summarize(runs)
    if len(groups) > 1:
        lines += [
            "## Overview",
            "",
            "Every group's primary metric, mean ± sample std over seeds (validation: the split to choose on).",
            "",
            *overview_table(groups),
            "",
        ]
    for group in groups:
        lines += _group_section(group, plots_dir)
    spec = root / "sweep.yaml"
    if spec.exists():
        lines += ["## Sweep spec (sweep.yaml)", "", "```yaml", spec.read_text().rstrip(), "```", ""]
    path = out / "report.md"
    path.write_text(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n")
    return path
