"""Finished runs as numbers: groups of comparable runs, tables of mean ± std over seeds, and their markdown."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nmflow.app.report.runs import RunRecord
from nmflow.core.errors import ConfigError
from nmflow.core.masks import NMPattern
from nmflow.core.recipes import MDGF_ONLY_SETTINGS, METHOD_TABLE, METHODS, takes_decay

DECAYING = tuple(name for name, spec in METHOD_TABLE.items() if spec.progressive)


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
    seeds: tuple[int | None, ...] = ()  # the seed of each value, where known: pairs runs across methods

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
    def paired(self) -> Cell | None:
        """Per seed, the decaying recipe's value minus SR-STE's (same initialisation and batch order): the
        seed-to-seed variation both share cancels, so this spread is the finer test. None without 2 common seeds."""
        srste = {seed: value for seed, value in zip(self.srste.seeds, self.srste.values) if seed is not None}
        pairs = [value - srste[seed] for seed, value in zip(self.decaying.seeds, self.decaying.values) if seed in srste]
        return Cell(tuple(pairs)) if len(pairs) > 1 else None

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
    runs: tuple[RunRecord, ...]
    sparsities: dict[
        str, dict[str, NMPattern]
    ]  # row label -> the sparsity (role -> pattern) of its runs, densest first
    tables: tuple[Table, ...]
    comparisons: tuple[Comparison, ...]


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (a missing or null field gives None)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def pattern_label(sparsity: dict[str, NMPattern]) -> str:
    return ", ".join(f"{role}={pattern}" for role, pattern in sparsity.items()) or "dense"


def sparsity_density(sparsity: dict[str, NMPattern]) -> float:
    return statistics.fmean(p.density for p in sparsity.values()) if sparsity else 1.0


PER_RUN_KEYS = {"method", "sparsity", "seed", "out", "init_from", "nmflow_version", "device", "threads"}
"""Config keys that vary inside one table, or that do not change the numbers; any other key splits groups."""
LOGGING_KEYS = {"tensorboard", "log_every", "eval_every", "save_every", "keep_checkpoints", "diagnostics"}


def _group_key(run: RunRecord) -> tuple[str, bool, str]:
    """(task, fine-tuned, the settings shared by the group as text): runs differing elsewhere are not comparable.
    The mdgf-* settings count for the mdgf-* runs only."""
    ignored = PER_RUN_KEYS | LOGGING_KEYS | {"task"}
    if not takes_decay(run.method):
        ignored |= set(MDGF_ONLY_SETTINGS)
    shared = {key: value for key, value in run.config.items() if key not in ignored}
    return (str(run.get("task", "?")), run.config.get("init_from") is not None, json.dumps(shared, sort_keys=True))


def _share_references(by_key: dict[tuple[str, bool, str], list[RunRecord]]) -> None:
    """Runs of methods that take no mdgf-* setting join every group that differs from theirs only in those
    settings: SR-STE and dense are the reference of each MDGF decay tried, not a group of their own."""

    def without_mdgf(key: tuple[str, bool, str]) -> tuple[str, bool, str]:
        settings = {k: v for k, v in json.loads(key[2]).items() if k not in MDGF_ONLY_SETTINGS}
        return (key[0], key[1], json.dumps(settings, sort_keys=True))

    for key in [k for k, runs in by_key.items() if not any(takes_decay(r.method) for r in runs)]:
        targets = [k for k in by_key if k != key and without_mdgf(k) == key]
        for target in targets:
            by_key[target] += by_key[key]
        if targets:
            del by_key[key]


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
    if value is None or value == {}:  # not set: the library's default applies
        return "default"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items())) + "}"
    return str(value)


def summarize(runs: Iterable[RunRecord]) -> list[Group]:
    """The finished runs as groups of tables, ready to render or to check."""
    by_key: dict[tuple[str, bool, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.status == "finished" and not run.is_pretraining:
            by_key[_group_key(run)].append(run)
    _share_references(by_key)
    labels = _group_labels(by_key)
    return [_group(labels[key], by_key[key]) for key in sorted(by_key, key=lambda k: (k[0], k[1], labels[k]))]


def _group(label: str, runs: list[RunRecord]) -> Group:
    metric = str(runs[0].get("metric") or TASK_METRIC.get(str(runs[0].get("task")), "accuracy"))
    if metric not in METRICS:
        raise ConfigError(f"run {runs[0].path}: unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    sparsities = {pattern_label(r.sparsity): r.sparsity for r in runs if r.method != "dense"}
    sparsities = dict(sorted(sparsities.items(), key=lambda item: (-sparsity_density(item[1]), item[0])))
    methods = tuple(ordered_methods(r.method for r in runs))
    rows = tuple(sparsities) or ("dense",)  # a group of dense runs only still gets its row
    tables = tuple(_table(spec, runs, rows, methods) for spec in METRICS[metric])
    primary = next(t for t in tables if t.metric.key == PRIMARY[metric])
    selection = next(t for t in tables if t.metric.key == SELECTION[metric])
    return Group(label, metric, tuple(runs), sparsities, tables, _comparisons(primary, selection))


def _table(metric: Metric, runs: list[RunRecord], rows: tuple[str, ...], methods: tuple[str, ...]) -> Table:
    values: dict[tuple[str, str], list[tuple[float, int | None]]] = defaultdict(list)
    for run in runs:
        value = finite_number((run.summary or {}).get(metric.key))
        if value is not None:
            seed = run.get("seed")
            for row in rows if run.method == "dense" else (pattern_label(run.sparsity),):
                values[row, run.method].append((value * metric.scale, seed if isinstance(seed, int) else None))
    cells = {key: Cell(tuple(v for v, _ in pairs), tuple(s for _, s in pairs)) for key, pairs in values.items()}
    return Table(metric, rows, methods, cells)


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


def ordered_methods(methods: Iterable[str]) -> list[str]:
    methods = set(methods)
    return [m for m in METHODS if m in methods] + sorted(methods - set(METHODS))


# ------------------------------------------------------------------------------------------------ markdown
def markdown_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
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

    return markdown_table(
        ["pattern", *table.methods], ([row] + [cell_text(row, m) for m in table.methods] for row in table.rows)
    )


def render_comparisons(comparisons: tuple[Comparison, ...]) -> list[str]:
    fmt = comparisons[0].metric.format
    header = ["pattern", "best decaying", "its mean", "srste mean", "difference", "pooled std", "verdict"]
    header += ["paired difference (same seeds)"]
    rows = (
        [
            c.pattern,
            c.method,
            fmt(c.decaying.mean),
            fmt(c.srste.mean),
            f"{c.difference:+.{c.metric.digits}f}",
            fmt(c.pooled_std),
            c.verdict,
            "–" if c.paired is None else f"{c.paired.mean:+.{c.metric.digits}f} ± {fmt(c.paired.std)} (n={c.paired.n})",
        ]
        for c in comparisons
    )
    return markdown_table(header, rows)


def overview_table(groups: list[Group]) -> list[str]:
    """One row per group, method and pattern, validation next to test: sweeps whose groups are the
    experiment (a setting varied across tasks, e.g. the decay end or the step count) compare them here."""
    rows = []
    for group in groups:
        by_key = {t.metric.key: t for t in group.tables}
        validation, test = by_key[SELECTION[group.metric]], by_key[PRIMARY[group.metric]]
        for pattern in test.rows:
            for method in test.methods:
                if (pattern, method) not in test.cells or (method == "dense" and pattern != test.rows[0]):
                    continue
                cells = [t.cells.get((pattern, method)) for t in (validation, test)]
                texts = [
                    f"{t.metric.format(c.mean)} ± {t.metric.format(c.std)}" if c else "–"
                    for t, c in zip((validation, test), cells)
                ]
                pattern_text = "–" if method == "dense" else pattern
                rows.append(
                    [
                        group.label,
                        test.metric.title.removeprefix("Test "),
                        pattern_text,
                        method,
                        *texts,
                        str(cells[1].n),
                    ]
                )
    header = ["group", "metric", "pattern", "method", "validation", "test", "seeds"]
    return markdown_table(header, rows)


def focus_pattern(group: Group) -> str | None:
    """1:16 everywhere if the group has it (the paper's main setting), else the sparsest pattern."""
    if not group.sparsities:
        return None
    all_1_16 = [label for label, p in group.sparsities.items() if all(str(x) == "1:16" for x in p.values())]
    sparsest = min(group.sparsities, key=lambda label: sparsity_density(group.sparsities[label]))
    return all_1_16[0] if all_1_16 else sparsest


# ------------------------------------------------------------------------------------------------ diagnostics
DIAGNOSTICS = (  # (metrics key, column title, reduction over the sparse window)
    ("grad_abs_var", "variance of abs(grad), mean", statistics.fmean),
    ("exp_avg_sq_var", "variance of exp_avg_sq, mean", statistics.fmean),
    ("exp_avg_sq_norm", "norm of exp_avg_sq, mean", statistics.fmean),
    ("flip_rate", "flip rate, median", statistics.median),
)


def diagnostics_table(group: Group, key: str = "ff") -> list[str]:
    """The paper's §4 statistics per method at the focus pattern, reduced over the sparse window (the steps
    between the dense phase and fine-tuning; the dense method over the same steps): mean ± std over seeds."""
    from nmflow.app.report.runs import read_metrics

    focus = focus_pattern(group)
    runs = [r for r in group.runs if r.method == "dense" or (focus and pattern_label(r.sparsity) == focus)]
    windows = [tuple(r.summary["phases"]["sparse"]) for r in runs if "sparse" in (r.summary or {}).get("phases", {})]
    if focus is None or not windows:
        return []
    start, stop = windows[0]
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        lines = [line for line in read_metrics(run.path)[0] if start < line["step"] <= stop]
        for name, _, reduce in DIAGNOSTICS:
            series = [line[name][key] for line in lines if isinstance(line.get(name), dict) and key in line[name]]
            if series:
                values[run.method, name].append(reduce(series))
    methods = [
        m for m in ordered_methods(r.method for r in runs) if any((m, name) in values for name, _, _ in DIAGNOSTICS)
    ]
    if not methods:
        return []

    def cell(method: str, name: str) -> str:
        found = values.get((method, name))
        if not found:
            return ""
        spread = f" ± {statistics.stdev(found):.2g}" if len(found) > 1 else ""
        return f"{statistics.fmean(found):.3g}{spread}"

    header = ["method", *(title for _, title, _ in DIAGNOSTICS)]
    rows = ([method, *(cell(method, name) for name, _, _ in DIAGNOSTICS)] for method in methods)
    intro = (
        f"At {focus}, {key} layers, over steps {start + 1}-{stop} (the sparse window); mean ± std over seeds of each "
        "run's reduction."
    )
    return [intro, "", *markdown_table(header, rows)]
