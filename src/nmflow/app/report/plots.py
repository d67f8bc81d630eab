"""The report's figures. matplotlib is imported only when drawing, so `import nmflow.app.report` stays light."""

from __future__ import annotations

import itertools
import math
import re
import statistics
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nmflow.app.report.runs import RunRecord, read_metrics
from nmflow.app.report.tables import (
    METRICS,
    PRIMARY,
    Cell,
    Group,
    Metric,
    Table,
    finite_number,
    focus_pattern,
    ordered_methods,
    pattern_label,
    sparsity_density,
)
from nmflow.core.recipes import METHOD_TABLE, METHODS, takes_decay

DIAGNOSTIC_KEY = "ff"  # the role whose diagnostics are plotted
MDGF_D_BY_PHASE = {"dense": 1.0, "finetune": 0.0}
MAX_ISO_FLOPS_PANELS = 6


@dataclass(frozen=True)
class _PlotData:
    group: Group
    metrics: dict[Path, tuple[list[dict[str, Any]], list[dict[str, Any]]]]
    focus: str | None  # the pattern of the per-step plots

    @property
    def primary(self) -> Table:
        return next(t for t in self.group.tables if t.metric.key == PRIMARY[self.group.metric])

    @property
    def focus_runs(self) -> list[RunRecord]:
        return [r for r in self.group.runs if r.method == "dense" or pattern_label(r.sparsity) == self.focus]


def draw_plots(group: Group, plots_dir: Path) -> list[str]:
    """Draw every plot of ``group``; markdown that embeds each one, or says why it was skipped."""
    from matplotlib.figure import Figure  # here, not at the top: `import nmflow` stays light

    def new_figure(width: float, height: float) -> Any:
        return Figure(figsize=(width, height), layout="constrained")

    data = _PlotData(group, {r.path: read_metrics(r.path) for r in group.runs}, focus_pattern(group))
    slug = re.sub(r"[^a-z0-9]+", "-", group.label.lower()).strip("-")
    lines = []
    for name, title, draw in PLOTS:
        drawn = draw(data, new_figure) if data.focus is not None else "no sparse runs"
        if isinstance(drawn, str):
            lines += [f"*{title}: skipped ({drawn}).*", ""]
            continue
        figure, caption = drawn
        # wrapped to the figure's width: a group label can name several settings
        figure.suptitle(textwrap.fill(f"{group.label}: {title}", width=int(figure.get_figwidth() * 11)))
        figure.savefig(plots_dir / f"{slug}-{name}.png", dpi=100)
        lines += [f"![{title}](plots/{slug}-{name}.png)", "", f"*{caption}*", ""]
    return lines


def _color(method: str) -> str:
    return "0.35" if method == "dense" else f"C{METHODS.index(method) - 1}" if method in METHODS else "C9"


def _error_bar(cell: Cell) -> float:
    return 0.0 if cell.n < 2 else cell.std


def _log_y(ax: Any, values: list[float], always: bool = False) -> None:
    """Log scale where values span a decade or more (or always); symlog when some are zero."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and (always or max(positive) >= 10 * min(positive)):
        ax.set_yscale("log")
    elif positive and always:
        ax.set_yscale("symlog", linthresh=min(positive))


def _plot_vs_sparsity(data: _PlotData, new_figure: Callable) -> tuple[Any, str] | str:
    group, table = data.group, data.primary
    role_sets = Counter(tuple(p) for p in group.sparsities.values()).most_common(1)
    if not role_sets:
        return "no sparse runs"
    rows = [label for label, p in group.sparsities.items() if tuple(p) == role_sets[0][0]]
    x = {row: sparsity_density(group.sparsities[row]) for row in rows}
    ticks: dict[float, list[str]] = defaultdict(list)
    for row in rows:
        p = group.sparsities[row]
        ticks[x[row]].append(str(next(iter(p.values()))) if len(p) == 1 else row)
    figure = new_figure(6.4, 4.4)
    ax = figure.subplots()
    values = []
    for method in (m for m in table.methods if m != "dense"):
        cells = [(x[row], table.cells[row, method]) for row in rows if (row, method) in table.cells]
        if cells:
            means = [c.mean for _, c in cells]
            stds = [_error_bar(c) for _, c in cells]
            ax.errorbar(
                [px for px, _ in cells], means, yerr=stds, marker="o", capsize=3, label=method, color=_color(method)
            )
            values += means
    dense = table.cells.get((rows[0], "dense"))
    if dense is not None:
        std = _error_bar(dense)
        ax.axhspan(dense.mean - std, dense.mean + std, color="0.6", alpha=0.3, lw=0)
        ax.axhline(dense.mean, color=_color("dense"), ls="--", label="dense (mean ± std)")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(list(ticks), labels=["\n".join(labels) for labels in ticks.values()])
    ax.invert_xaxis()
    _log_y(ax, values)
    roles = ", ".join(role_sets[0][0])
    ax.set(xlabel=f"{roles} pattern (density N/M, log2 scale; sparser to the right)", ylabel=table.metric.title)
    ax.legend(fontsize="small")
    return figure, f"{table.metric.title} against sparsity; error bars and band: sample std over seeds."


def pareto_frontier(
    points: Iterable[tuple[float, float, str]], higher_is_better: bool
) -> list[tuple[float, float, str]]:
    """The (cost, value, name) points that no cheaper-or-equal point beats, cheapest first."""
    sign = 1.0 if higher_is_better else -1.0
    frontier: list[tuple[float, float, str]] = []
    for point in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not frontier or sign * point[1] > sign * frontier[-1][1]:
            frontier.append(point)
    return frontier


def _plot_vs_inference_flops(data: _PlotData, new_figure: Callable) -> tuple[Any, str] | str:
    metric = data.primary.metric
    points: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for run in data.group.runs:
        flops = run.get("inference_flops")
        flops = finite_number(flops.get("sparse")) if isinstance(flops, dict) else None
        value = finite_number((run.summary or {}).get(metric.key))
        if flops is not None and value is not None:
            points[run.method, pattern_label(run.sparsity)].append((flops, value * metric.scale))
    if not points:
        return "no inference_flops in the summaries"
    figure = new_figure(6.4, 4.4)
    ax = figure.subplots()
    means = []
    for method in ordered_methods(m for m, _ in points):
        cells = [(row, xy) for (m, row), xy in points.items() if m == method]
        xs = [statistics.fmean(f for f, _ in xy) for _, xy in cells]
        cells_y = [Cell(tuple(v for _, v in xy)) for _, xy in cells]
        stds = [_error_bar(c) for c in cells_y]
        ax.errorbar(xs, [c.mean for c in cells_y], yerr=stds, fmt="o", capsize=3, label=method, color=_color(method))
        means += [(px, c.mean, row) for px, c, (row, _) in zip(xs, cells_y, cells)]
    frontier = pareto_frontier(means, metric.higher_is_better)
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "k:", lw=1.2, label="Pareto frontier")
    for px, y, row in frontier:
        ax.annotate(row, (px, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set_xscale("log")
    _log_y(ax, [p[1] for p in means])
    ax.set(xlabel="inference FLOPs per example (forward, sparse)", ylabel=metric.title)
    ax.legend(fontsize="small")
    return figure, f"{metric.title} against inference cost; the dotted line joins the runs no other beats on both."


def _plot_iso_flops(data: _PlotData, new_figure: Callable) -> tuple[Any, str] | str:
    val = next(m for m in METRICS[data.group.metric] if m.key.startswith("val_"))
    rows = list(data.group.sparsities)[:MAX_ISO_FLOPS_PANELS]
    if not rows:
        return "no sparse runs"
    columns = min(3, len(rows))
    figure = new_figure(4.4 * columns + 1.4, 3.5 * math.ceil(len(rows) / columns))
    axes = list(figure.subplots(math.ceil(len(rows) / columns), columns, squeeze=False).flat)
    drawn = False
    for ax, row in zip(axes, rows):
        curves: dict[str, list[list[tuple[float, float]]]] = {}
        for run in data.group.runs:
            if run.method != "dense" and pattern_label(run.sparsity) != row:
                continue
            final = {**(run.summary or {}), "train_flops": run.get("training_flops")}
            curve = _flops_curve(data.metrics[run.path][1], val) or _flops_curve([final], val)
            if curve:
                curves.setdefault(run.method, []).append(curve)
        values = []
        for method in ordered_methods(curves):
            mean_curve = _mean_curve(curves[method])
            ax.plot(*zip(*mean_curve), marker="o", ms=3, lw=1.2, color=_color(method), label=method)
            values += [y for _, y in mean_curve]
        _log_y(ax, values)
        ax.set(title=row, xlabel="training FLOPs (cumulative)", ylabel=val.title)
        if curves and not drawn:
            ax.legend(fontsize="small")
        drawn = drawn or bool(curves)
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    if not drawn:
        return "no train_flops in the metrics or summaries"
    shown = "" if len(rows) == len(data.group.sparsities) else f" (the {len(rows)} densest patterns)"
    caption = (
        f"{val.title} at each evaluation (mean over seeds) against the training compute spent so far{shown}. "
        "Before the last point, MDGF runs are scored with their soft masks (pruned weights scaled by D)."
    )
    return figure, caption


def _mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Seeds of one method evaluate at the same steps and FLOPs: average them point by point."""
    length = min(len(curve) for curve in curves)
    return [
        (statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves)) for i in range(length)
    ]


def _flops_curve(records: list[dict[str, Any]], metric: Metric) -> list[tuple[float, float]]:
    pairs = ((finite_number(r.get("train_flops")), finite_number(r.get(metric.key))) for r in records)
    return [(x, y * metric.scale) for x, y in pairs if x is not None and y is not None]


def _step_series(
    data: _PlotData, runs: list[RunRecord], field: str, smooth: bool, by_phase: dict[str, float] | None = None
) -> dict[str, tuple[list, list]]:
    """Per method, the mean over seeds at each step of ``field`` (a number, or a per-role mapping: its ff entry);
    ``by_phase`` gives the value of steps that log none, by their phase."""
    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for record in data.metrics[run.path][0]:
            value = record.get(field)
            value = finite_number(value.get(DIAGNOSTIC_KEY) if isinstance(value, dict) else value)
            if value is None and by_phase:
                value = by_phase.get(record.get("phase"))
            if value is not None:
                by_method[run.method][record["step"]].append(value)
    series = {}
    for method in ordered_methods(by_method):
        steps = sorted(by_method[method])
        values = [statistics.fmean(by_method[method][s]) for s in steps]
        series[method] = (steps, _running_mean(values) if smooth else values)
    return series


def _running_mean(values: list[float]) -> list[float]:
    """Trailing mean over a window of 1/20 of the points (at least 1)."""
    window = max(1, len(values) // 20)
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(values))]


def _panels(new_figure: Callable, panels: list[tuple[str, dict[str, tuple[list, list]]]], log: bool) -> Any | None:
    """One axis per (y label, series); None when every series is empty."""
    if not any(series for _, series in panels):
        return None
    figure = new_figure(5.0 * len(panels), 3.8)
    for ax, (label, series) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for method, (steps, values) in series.items():
            ax.plot(steps, values, lw=1.2, color=_color(method), label=method)
        if log:
            _log_y(ax, [v for _, values in series.values() for v in values], always=True)
        ax.set(xlabel="step", ylabel=label)
        if series:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
    return figure


def _plot_gradient_noise(data: _PlotData, new_figure: Callable) -> tuple[Any, str] | str:
    fields = ("grad_abs_var", "exp_avg_sq_var", "exp_avg_sq_norm")
    panels = [(f"{f}[{DIAGNOSTIC_KEY}]", _step_series(data, data.focus_runs, f, smooth=True)) for f in fields]
    figure = _panels(new_figure, panels, log=True)
    if figure is None:
        return f"no {', '.join(fields)} in the metrics"
    return figure, f"Gradient noise at {data.focus} (running mean, mean over seeds; dense as baseline)."


def _plot_flip_rate(data: _PlotData, new_figure: Callable) -> tuple[Any, str] | str:
    series = _step_series(data, [r for r in data.focus_runs if r.method != "dense"], "flip_rate", smooth=True)
    figure = _panels(new_figure, [(f"flip rate [{DIAGNOSTIC_KEY}]", series)], log=True)
    if figure is None:
        return "no flip_rate in the metrics"
    return figure, f"Fraction of {DIAGNOSTIC_KEY} mask entries that flip per step at {data.focus} (running mean)."


def _walks(method: str) -> bool:
    """Whether ``method`` walks patterns (SDGF), so its density tells the schedules apart."""
    spec = METHOD_TABLE.get(method)
    return spec is not None and spec.walk is not None


def _plot_schedules(data: _PlotData, new_figure: Callable) -> tuple[Any, str] | str:
    mdgf_runs = [r for r in data.focus_runs if takes_decay(r.method)]
    # the runs whose density tells the schedules apart; else (MDGF only) the density of their binary masks
    density_runs = [r for r in data.focus_runs if _walks(r.method) or r.method in ("dense", "srste")]
    density_runs = density_runs or data.focus_runs
    panels = [
        # D is logged while it decays; the dense phase multiplies pruned weights by 1, fine-tuning by 0
        ("decay factor D (MDGF)", _step_series(data, mdgf_runs, "D", smooth=False, by_phase=MDGF_D_BY_PHASE)),
        (f"density [{DIAGNOSTIC_KEY}]", _step_series(data, density_runs, "density", smooth=False)),
    ]
    figure = _panels(new_figure, panels, log=False)
    if figure is None:
        return "no D or density in the metrics"
    return figure, f"Schedules at {data.focus}: MDGF's decay factor D and the {DIAGNOSTIC_KEY} density over steps."


PLOTS = (
    ("vs-sparsity", "metric vs sparsity", _plot_vs_sparsity),
    ("vs-inference-flops", "metric vs inference FLOPs", _plot_vs_inference_flops),
    ("iso-flops", "validation metric vs training FLOPs", _plot_iso_flops),
    ("gradient-noise", "gradient noise", _plot_gradient_noise),
    ("flip-rate", "mask flip rate", _plot_flip_rate),
    ("schedules", "schedules", _plot_schedules),
)
