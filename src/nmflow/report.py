"""`nmflow report`: turn a folder of runs into the paper's tables and plots (``report.md`` + ``plots/*.png``).

    nmflow report runs/sweep-1                 # writes runs/sweep-1/report.md and runs/sweep-1/plots/

A run folder is any folder below the sweep folder holding ``config.yaml`` or ``failed.json`` (``checkpoints/``
and ``tensorboard/`` are not searched). A run is *finished* when it wrote ``summary.json``, *failed* when it
wrote ``failed.json``, *incomplete* otherwise; the report lists every run that did not finish, so no crash
goes unseen. Finished runs are grouped by task, then apart for fine-tuning runs (``init_from`` set), model
overrides and step counts, since numbers from different protocols are not comparable.

From Python: ``summarize(collect_runs(folder))`` gives the tables as numbers, ``write_report(folder)`` the files.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nmflow.errors import ConfigError
from nmflow.masks import NMPattern

__all__ = [
    "Cell",
    "Comparison",
    "Group",
    "Metric",
    "Run",
    "Table",
    "collect_runs",
    "pareto_frontier",
    "read_metrics",
    "render_table",
    "summarize",
    "write_report",
]

METHOD_ORDER = ("dense", "ste", "srste", "oneshot", "mdgf-linear", "mdgf-exp", "sdgf-stepwise", "sdgf-geometric")
DECAYING = ("mdgf-linear", "mdgf-exp", "sdgf-stepwise", "sdgf-geometric")
SKIPPED_FOLDERS = {"checkpoints", "tensorboard"}
DIAGNOSTIC_KEY = "ff"  # the role whose diagnostics are plotted
MAX_ISO_FLOPS_PANELS = 6


@dataclass(frozen=True)
class Run:
    """One run folder as found on disk."""

    path: Path
    status: str  # "finished" | "failed" | "incomplete"
    config: dict[str, Any]
    summary: dict[str, Any] | None = None
    error: str | None = None
    returncode: int | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the summary, else of the config: the summary holds what the run actually used."""
        if self.summary is not None and key in self.summary:
            return self.summary[key]
        return self.config.get(key, default)

    @property
    def method(self) -> str:
        return str(self.get("method", "?"))

    @property
    def is_pretraining(self) -> bool:
        """The dense first stage of `nmflow sweep`'s fine-tune protocol: an input to other runs, not a result."""
        return self.path.parent.name == "pretrain"

    @property
    def sparsity(self) -> dict[str, NMPattern]:
        """Role -> pattern, sorted by role; empty for dense runs, whose sparsity setting has no effect."""
        if self.method == "dense":
            return {}
        try:
            return {role: NMPattern.parse(value) for role, value in sorted(dict(self.get("sparsity") or {}).items())}
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"run {self.path}: unusable sparsity {self.get('sparsity')!r} ({err})") from None


@dataclass(frozen=True)
class Metric:
    """A summary field as a table shows it."""

    key: str
    title: str
    higher_is_better: bool
    digits: int
    scale: float = 1.0

    def format(self, value: float) -> str:
        return "–" if math.isnan(value) else f"{value:.{self.digits}f}"


METRICS = {
    "accuracy": (
        Metric("test_accuracy", "Test accuracy (%)", True, 1, 100.0),
        Metric("val_accuracy", "Validation accuracy (%)", True, 1, 100.0),
    ),
    "perplexity": (
        Metric("test_loss", "Test loss", False, 3),
        Metric("test_perplexity", "Test perplexity", False, 2),
        Metric("val_perplexity", "Validation perplexity", False, 2),
    ),
}
PRIMARY = {"accuracy": "test_accuracy", "perplexity": "test_perplexity"}
SELECTION = {"accuracy": "val_accuracy", "perplexity": "val_perplexity"}  # picks the best decaying recipe
TASK_METRIC = {"vision": "accuracy", "language": "perplexity"}


@dataclass(frozen=True)
class Cell:
    """The values of one method at one pattern, one per seed."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); NaN for one seed."""
        return statistics.stdev(self.values) if self.n > 1 else math.nan


@dataclass(frozen=True)
class Table:
    """Rows are sparsity patterns (densest first), columns methods; the dense column repeats the dense runs."""

    metric: Metric
    rows: tuple[str, ...]
    methods: tuple[str, ...]
    cells: dict[tuple[str, str], Cell]

    def best(self, row: str) -> set[str]:
        """The sparse methods with the best mean in ``row`` (several on a tie)."""
        means = {m: self.cells[row, m].mean for m in self.methods if m != "dense" and (row, m) in self.cells}
        if not means:
            return set()
        pick = max if self.metric.higher_is_better else min
        best = pick(means.values())
        return {m for m, value in means.items() if value == best}


@dataclass(frozen=True)
class Comparison:
    """The best decaying recipe (MDGF/SDGF) against SR-STE at one pattern."""

    pattern: str
    method: str
    decaying: Cell
    srste: Cell
    metric: Metric

    @property
    def difference(self) -> float:
        return self.decaying.mean - self.srste.mean

    @property
    def pooled_std(self) -> float:
        dof = self.decaying.n + self.srste.n - 2
        if dof <= 0:
            return math.nan
        squares = sum((c.n - 1) * c.std**2 for c in (self.decaying, self.srste) if c.n > 1)
        return math.sqrt(squares / dof)

    @property
    def verdict(self) -> str:
        stds = [c.std for c in (self.decaying, self.srste) if c.n > 1]
        if not stds:
            return "no spread (one seed each)"
        spread = max(stds)
        gain = self.difference if self.metric.higher_is_better else -self.difference
        if gain > spread:
            return "beats by more than the spread"
        if gain < -spread:
            return "worse by more than the spread"
        return "within spread"


@dataclass(frozen=True)
class Group:
    """Finished runs that can be compared: same task, protocol, model and step count."""

    label: str
    metric: str  # "accuracy" | "perplexity"
    runs: tuple[Run, ...]
    patterns: dict[str, dict[str, NMPattern]]  # row label -> role patterns, densest first
    tables: tuple[Table, ...]
    comparisons: tuple[Comparison, ...]


# ----------------------------------------------------------------------------------------------- reading runs
def collect_runs(runs_dir: str | Path) -> list[Run]:
    """Every run folder below ``runs_dir`` (itself included), sorted by path."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"runs folder {root} does not exist or is not a folder")
    folders = {
        file.parent
        for marker in ("config.yaml", "run.yaml", "failed.json")
        for file in root.rglob(marker)
        if not SKIPPED_FOLDERS.intersection(file.relative_to(root).parts[:-1])
    }
    return [_read_run(folder) for folder in sorted(folders)]


def _read_run(folder: Path) -> Run:
    config: dict[str, Any] = {}
    try:
        config = _read_mapping(folder / "config.yaml", yaml.safe_load) or {}
        config = config or _read_mapping(folder / "run.yaml", yaml.safe_load) or {}  # what nmflow sweep asked for
        summary = _read_mapping(folder / "summary.json", json.loads)
        failure = _read_mapping(folder / "failed.json", json.loads)
    except ValueError as err:  # a file cut off mid-write, or not a mapping: the run did not finish cleanly
        return Run(folder, "failed", config, error=f"unreadable {err}")
    if summary is not None:
        return Run(folder, "finished", config, summary)
    if failure is not None:
        return Run(folder, "failed", config, error=str(failure.get("error", "")), returncode=failure.get("returncode"))
    return Run(folder, "incomplete", config)


def _read_mapping(path: Path, parse: Callable[[str], Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path.name}: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path.name}: holds {type(data).__name__}, not a mapping")
    return data


def read_metrics(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and evaluation lines of ``metrics.jsonl``; a line cut off by a crash is skipped."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    path = folder / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            (evals if "val_loss" in record else train).append(record)
    return train, evals


# ------------------------------------------------------------------------------------------------ tables
def _number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (a missing or null field gives None)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def pattern_label(sparsity: dict[str, NMPattern]) -> str:
    return ", ".join(f"{role}={pattern}" for role, pattern in sparsity.items()) or "dense"


def _density(sparsity: dict[str, NMPattern]) -> float:
    return statistics.fmean(p.density for p in sparsity.values()) if sparsity else 1.0


PER_RUN_KEYS = {"method", "sparsity", "seed", "out", "init_from", "nmflow_version", "device", "threads"}
"""Config keys that vary inside one table, or that do not change the numbers; any other key splits groups."""
LOGGING_KEYS = {"tensorboard", "log_every", "eval_every", "save_every", "keep_checkpoints", "diagnostics"}


def _group_key(run: Run) -> tuple[str, bool, str]:
    """(task, fine-tuned, the settings shared by the group as text): runs differing elsewhere are not comparable."""
    shared = {key: value for key, value in run.config.items() if key not in PER_RUN_KEYS | LOGGING_KEYS | {"task"}}
    return (str(run.get("task", "?")), run.config.get("init_from") is not None, json.dumps(shared, sort_keys=True))


def _group_labels(keys: Iterable[tuple[str, bool, str]]) -> dict[tuple[str, bool, str], str]:
    """Task (+ fine-tune), then the settings in which the groups of one task differ, e.g. ``steps=400``."""
    keys = list(keys)
    labels = {}
    for key in keys:
        task, finetune, shared = key
        settings = json.loads(shared)
        others = [json.loads(k[2]) for k in keys if k[:2] == key[:2] and k != key]
        differing = sorted(name for name in settings if any(o.get(name) != settings[name] for o in others))
        parts = [task + (" (fine-tune)" if finetune else "")]
        parts += [f"{name}={_setting_text(settings[name])}" for name in differing]
        labels[key] = ", ".join(parts)
    return labels


def _setting_text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items())) + "}"
    return str(value)


def summarize(runs: Iterable[Run]) -> list[Group]:
    """The finished runs as groups of tables, ready to render or to check."""
    by_key: dict[tuple[str, bool, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "finished" and not run.is_pretraining:
            by_key[_group_key(run)].append(run)
    labels = _group_labels(by_key)
    return [_group(labels[key], by_key[key]) for key in sorted(by_key, key=lambda k: (k[0], k[1], labels[k]))]


def _group(label: str, runs: list[Run]) -> Group:
    metric = str(runs[0].get("metric") or TASK_METRIC.get(str(runs[0].get("task")), "accuracy"))
    if metric not in METRICS:
        raise ConfigError(f"run {runs[0].path}: unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    patterns = {pattern_label(r.sparsity): r.sparsity for r in runs if r.method != "dense"}
    patterns = dict(sorted(patterns.items(), key=lambda item: (-_density(item[1]), item[0])))
    methods = tuple(_ordered(r.method for r in runs))
    rows = tuple(patterns) or ("dense",)  # a group of dense runs only still gets its row
    tables = tuple(_table(spec, runs, rows, methods) for spec in METRICS[metric])
    primary = next(t for t in tables if t.metric.key == PRIMARY[metric])
    selection = next(t for t in tables if t.metric.key == SELECTION[metric])
    return Group(label, metric, tuple(runs), patterns, tables, _comparisons(primary, selection))


def _table(metric: Metric, runs: list[Run], rows: tuple[str, ...], methods: tuple[str, ...]) -> Table:
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        value = _number((run.summary or {}).get(metric.key))
        if value is not None:
            for row in rows if run.method == "dense" else (pattern_label(run.sparsity),):
                values[row, run.method].append(value * metric.scale)
    return Table(metric, rows, methods, {key: Cell(tuple(v)) for key, v in values.items()})


def _comparisons(table: Table, selection: Table) -> tuple[Comparison, ...]:
    """Per pattern, the decaying recipe best on the validation split against SR-STE, on ``table`` (the test
    split): choosing the best of four on the test split itself would flatter the decaying recipes."""
    found = []
    for row in table.rows:
        decaying = [m for m in DECAYING if (row, m) in table.cells and (row, m) in selection.cells]
        if decaying and (row, "srste") in table.cells:
            pick = max if selection.metric.higher_is_better else min
            best = pick(decaying, key=lambda m: selection.cells[row, m].mean)
            found.append(Comparison(row, best, table.cells[row, best], table.cells[row, "srste"], table.metric))
    return tuple(found)


# ------------------------------------------------------------------------------------------------ markdown
def _markdown_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]


def render_table(table: Table) -> list[str]:
    """Mean ± std over seeds; bold marks the best sparse method of a row; n=k flags an unusual seed count."""
    usual_n = Counter(c.n for c in table.cells.values()).most_common(1)[0][0] if table.cells else 0
    fmt = table.metric.format

    def cell_text(row: str, method: str) -> str:
        cell = table.cells.get((row, method))
        if cell is None:
            return ""
        text = f"{fmt(cell.mean)} ± {fmt(cell.std)}" + (f" (n={cell.n})" if cell.n != usual_n else "")
        return f"**{text}**" if method in table.best(row) else text

    return _markdown_table(
        ["pattern", *table.methods], ([row] + [cell_text(row, m) for m in table.methods] for row in table.rows)
    )


def render_comparisons(comparisons: tuple[Comparison, ...]) -> list[str]:
    fmt = comparisons[0].metric.format
    header = ["pattern", "best decaying", "its mean", "srste mean", "difference", "pooled std", "verdict"]
    rows = (
        [
            c.pattern,
            c.method,
            fmt(c.decaying.mean),
            fmt(c.srste.mean),
            f"{c.difference:+.{c.metric.digits}f}",
            fmt(c.pooled_std),
            c.verdict,
        ]
        for c in comparisons
    )
    return _markdown_table(header, rows)


def _unfinished_section(root: Path, runs: list[Run]) -> list[str]:
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
    return ["## Runs that did not finish", "", *_markdown_table(header, rows), ""]


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
    lines += ["", "### Plots", ""]
    lines += _draw_plots(group, plots_dir)
    return lines + [""]


# ------------------------------------------------------------------------------------------------ plots
@dataclass(frozen=True)
class _PlotData:
    group: Group
    metrics: dict[Path, tuple[list[dict[str, Any]], list[dict[str, Any]]]]
    focus: str | None  # the pattern of the per-step plots

    @property
    def primary(self) -> Table:
        return next(t for t in self.group.tables if t.metric.key == PRIMARY[self.group.metric])

    @property
    def focus_runs(self) -> list[Run]:
        return [r for r in self.group.runs if r.method == "dense" or pattern_label(r.sparsity) == self.focus]


def _draw_plots(group: Group, plots_dir: Path) -> list[str]:
    """Draw every plot of ``group``; markdown that embeds each one, or says why it was skipped."""
    from matplotlib.figure import Figure  # here, not at the top: `import nmflow` stays light

    def new_figure(width: float, height: float) -> Any:
        return Figure(figsize=(width, height), layout="constrained")

    data = _PlotData(group, {r.path: read_metrics(r.path) for r in group.runs}, _focus_pattern(group))
    slug = re.sub(r"[^a-z0-9]+", "-", group.label.lower()).strip("-")
    lines = []
    for name, title, draw in PLOTS:
        drawn = draw(data, new_figure) if data.focus is not None else "no sparse runs"
        if isinstance(drawn, str):
            lines += [f"*{title}: skipped ({drawn}).*", ""]
            continue
        figure, caption = drawn
        figure.suptitle(f"{group.label}: {title}")
        figure.savefig(plots_dir / f"{slug}-{name}.png", dpi=100)
        lines += [f"![{title}](plots/{slug}-{name}.png)", "", f"*{caption}*", ""]
    return lines


def _focus_pattern(group: Group) -> str | None:
    """1:16 everywhere if the group has it (the paper's main setting), else the sparsest pattern."""
    if not group.patterns:
        return None
    all_1_16 = [label for label, p in group.patterns.items() if all(str(x) == "1:16" for x in p.values())]
    return all_1_16[0] if all_1_16 else min(group.patterns, key=lambda label: _density(group.patterns[label]))


def _color(method: str) -> str:
    return "0.35" if method == "dense" else f"C{METHOD_ORDER.index(method) - 1}" if method in METHOD_ORDER else "C9"


def _ordered(methods: Iterable[str]) -> list[str]:
    methods = set(methods)
    return [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))


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
    role_sets = Counter(tuple(p) for p in group.patterns.values()).most_common(1)
    if not role_sets:
        return "no sparse runs"
    rows = [label for label, p in group.patterns.items() if tuple(p) == role_sets[0][0]]
    x = {row: _density(group.patterns[row]) for row in rows}
    ticks: dict[float, list[str]] = defaultdict(list)
    for row in rows:
        p = group.patterns[row]
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
        flops = _number(flops.get("sparse")) if isinstance(flops, dict) else None
        value = _number((run.summary or {}).get(metric.key))
        if flops is not None and value is not None:
            points[run.method, pattern_label(run.sparsity)].append((flops, value * metric.scale))
    if not points:
        return "no inference_flops in the summaries"
    figure = new_figure(6.4, 4.4)
    ax = figure.subplots()
    means = []
    for method in _ordered(m for m, _ in points):
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
    rows = list(data.group.patterns)[:MAX_ISO_FLOPS_PANELS]
    if not rows:
        return "no sparse runs"
    columns = min(3, len(rows))
    figure = new_figure(4.4 * columns + 1.4, 3.5 * math.ceil(len(rows) / columns))
    axes = list(figure.subplots(math.ceil(len(rows) / columns), columns, squeeze=False).flat)
    handles: dict[str, Any] = {}
    for ax, row in zip(axes, rows):
        runs = [r for r in data.group.runs if r.method == "dense" or pattern_label(r.sparsity) == row]
        values = []
        for run in runs:
            final = {**(run.summary or {}), "train_flops": run.get("training_flops")}
            curve = _flops_curve(data.metrics[run.path][1], val) or _flops_curve([final], val)
            if curve:
                (line,) = ax.plot(
                    *zip(*curve),
                    marker="o" if len(curve) == 1 else None,
                    ms=4,
                    lw=1,
                    alpha=0.8,
                    color=_color(run.method),
                )
                handles.setdefault(run.method, line)
                values += [y for _, y in curve]
        _log_y(ax, values)
        ax.set(title=row, xlabel="training FLOPs (cumulative)", ylabel=val.title)
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    if not handles:
        return "no train_flops in the metrics or summaries"
    methods = _ordered(handles)
    figure.legend([handles[m] for m in methods], methods, loc="outside right upper", fontsize="small")
    shown = "" if len(rows) == len(data.group.patterns) else f" (the {len(rows)} densest patterns)"
    return figure, f"{val.title} along each run (one line per seed) against the training compute spent{shown}."


def _flops_curve(records: list[dict[str, Any]], metric: Metric) -> list[tuple[float, float]]:
    pairs = ((_number(r.get("train_flops")), _number(r.get(metric.key))) for r in records)
    return [(x, y * metric.scale) for x, y in pairs if x is not None and y is not None]


def _step_series(data: _PlotData, runs: list[Run], field: str, smooth: bool) -> dict[str, tuple[list, list]]:
    """Per method, the mean over seeds at each step of ``field`` (a number, or a per-role mapping: its ff entry)."""
    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for record in data.metrics[run.path][0]:
            value = record.get(field)
            value = _number(value.get(DIAGNOSTIC_KEY) if isinstance(value, dict) else value)
            if value is not None:
                by_method[run.method][record["step"]].append(value)
    series = {}
    for method in _ordered(by_method):
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


def _plot_schedules(data: _PlotData, new_figure: Callable) -> tuple[Any, str] | str:
    density_runs = [r for r in data.focus_runs if r.method.startswith("sdgf") or r.method in ("dense", "srste")]
    panels = [
        ("decay factor D (MDGF)", _step_series(data, data.focus_runs, "D", smooth=False)),
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


def _pretraining_note(runs: list[Run]) -> list[str]:
    stages = [r for r in runs if r.is_pretraining and r.status == "finished"]
    if not stages:
        return []
    steps = sorted({str(r.get("steps", "?")) for r in stages})
    note = f"{len(stages)} dense pretraining runs ({', '.join(steps)} steps) start the fine-tune groups"
    return [note + "; they are not in the tables.", ""]


def _not_started(root: Path, runs: list[Run]) -> list[str]:
    """The runs the sweep spec in ``root`` plans that have no folder yet (a sweep still going, or stopped)."""
    from nmflow.sweep import plan_sweep, read_spec

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
    for group in summarize(runs):
        lines += _group_section(group, plots_dir)
    spec = root / "sweep.yaml"
    if spec.exists():
        lines += ["## Sweep spec (sweep.yaml)", "", "```yaml", spec.read_text().rstrip(), "```", ""]
    path = out / "report.md"
    path.write_text(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n")
    return path
