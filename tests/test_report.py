"""`nmflow report` on a synthetic sweep: numbers against numpy, bold best cells, unfinished runs listed, valid plots."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from nmflow import METHODS
from nmflow.app.report import collect_runs, pareto_frontier, read_metrics, render_table, summarize, write_report
from nmflow.core.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 40
VISION = {  # method -> pattern -> test accuracies, one per seed
    "dense": {"": [0.95, 0.96, 0.94]},
    "ste": {"2:4": [0.90, 0.91, 0.89], "1:16": [0.60, 0.66, 0.63]},
    "srste": {"2:4": [0.93, 0.92, 0.935], "1:16": [0.70, 0.71]},  # one seed short: n=2
    "mdgf-exp": {"2:4": [0.91, 0.925, 0.92], "1:16": [0.80, 0.82, 0.78]},
    "sdgf-stepwise": {"2:4": [0.90, 0.915, 0.905], "1:16": [0.72, 0.69, 0.70]},
}
LANGUAGE = {  # method -> pattern -> test perplexities
    "dense": {"": [40.0, 41.5]},
    "srste": {"1:8": [55.0, 57.5], "2:4": [47.0, 46.2]},
    "mdgf-linear": {"1:8": [52.0, 52.4], "2:4": [47.5, 48.1]},
}


def _density(pattern: str) -> float:
    n, m = pattern.split(":")
    return int(n) / int(m)


def _write_run(folder: Path, config: dict, summary: dict | None, metrics: list[dict], failed: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if failed is not None:
        (folder / "failed.json").write_text(json.dumps(failed))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in metrics))


def _metrics(method: str, seed: int, pattern: str, val_key: str, final: float, diagnostics: bool) -> list[dict]:
    """Training lines with decaying diagnostics, evaluation lines every 10 steps."""
    rng = np.random.default_rng(seed)
    noise = 1 + METHODS.index(method) / 3  # tells the methods' curves apart
    density = _density(pattern) if pattern else 1.0
    lines = []
    for step in range(1, STEPS + 1):
        line = {"step": step, "loss": 2.0 / step, "lr": 1e-3, "phase": "sparse", "train_flops": step * 1000}
        line["D"] = 0.5 ** (step / 10) if method.startswith("mdgf") else None
        line["patterns"] = {"ff": pattern or "dense"}
        line["density"] = {"ff": max(density, 1 - step / STEPS) if method.startswith("sdgf") else density}
        if diagnostics:
            line["flip_rate"] = {"ff": float(0.1 * noise / step * rng.uniform(0.5, 1.5))}
            for key in ("grad_abs_var", "exp_avg_sq_var", "exp_avg_sq_norm"):
                line[key] = {"ff": float(noise * 10.0 ** (-step / 10) * rng.uniform(0.5, 1.5))}
        lines.append(line)
        if step % 10 == 0:
            lines.append({"step": step, "val_loss": 1.0, val_key: final * step / STEPS, "train_flops": step * 1000})
    lines[-1]["finalized"] = True
    return lines


def _add_runs(root: Path, task: str, table: dict, extra: dict | None = None) -> None:
    metric, value_key = ("accuracy", "test_accuracy") if task == "vision" else ("perplexity", "test_perplexity")
    val_key = value_key.replace("test", "val")
    for method, by_pattern in table.items():
        for pattern, values in by_pattern.items():
            for seed, value in enumerate(values):
                sparsity = {"ff": pattern} if pattern else {}
                config = {"task": task, "method": method, "sparsity": sparsity, "seed": seed, "steps": STEPS}
                config |= {"model": {}, "init_from": None} | (extra or {})
                summary = {"task": task, "metric": metric, "method": method, "sparsity": sparsity, "seed": seed}
                summary |= {value_key: value, val_key: value * 0.99, "test_loss": float(np.log(value)), "val_loss": 1.0}
                summary["inference_flops"] = {
                    "dense": 1000,
                    "sparse": int(1000 * (_density(pattern) if pattern else 1)),
                }
                summary |= {"training_flops": STEPS * 1000, "steps": STEPS, "wall_time_s": 1.0}
                diagnostics = method != "dense" or task == "language"  # vision's dense runs log no diagnostics
                lines = _metrics(method, seed, pattern, val_key, value, diagnostics)
                name = f"{method}-{pattern.replace(':', 'of') or 'none'}-s{seed}"
                _write_run(root / task / name, config, summary, lines)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    _add_runs(root, "vision", VISION)
    _add_runs(root, "language", LANGUAGE)
    _add_runs(root / "finetune", "vision", {"srste": {"1:16": [0.5]}}, {"init_from": "runs/dense"})
    config = {"task": "vision", "method": "mdgf-exp", "sparsity": {"ff": "1:32"}, "seed": 0, "steps": STEPS}
    traceback = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n"
    _write_run(root / "vision" / "broken", config, None, [])
    (root / "vision" / "broken" / "summary.json").write_text('{"task": "vis')  # cut off mid-write
    _write_run(root / "vision" / "crashed", config, None, [], {"error": traceback, "returncode": 1})
    _write_run(
        root / "vision" / "cut-off", config | {"seed": 1}, None, _metrics("mdgf-exp", 1, "1:32", "x", 1, True)[:7]
    )
    # a checkpoint folder holds a config.yaml copy: not a run
    (root / "vision" / "ste-2of4-s0" / "checkpoints" / "step-10").mkdir(parents=True)
    (root / "vision" / "ste-2of4-s0" / "checkpoints" / "step-10" / "config.yaml").write_text("task: vision\n")
    (root / "sweep.yaml").write_text("methods: [ste, srste]\n")
    write_report(root)
    return root


def _table(groups, label: str, key: str):
    group = next(g for g in groups if g.label == label)
    return next(t for t in group.tables if t.metric.key == key)


def test_collect_runs_finds_every_run_and_its_status(sweep):
    runs = {r.path.relative_to(sweep).as_posix(): r for r in collect_runs(sweep)}
    expected = sum(len(v) for t in (VISION, LANGUAGE) for p in t.values() for v in p.values()) + 1 + 3
    assert len(runs) == expected
    assert runs["vision/crashed"].status == "failed" and "out of memory" in runs["vision/crashed"].error
    assert runs["vision/cut-off"].status == "incomplete" and runs["vision/cut-off"].summary is None
    assert runs["language/srste-1of8-s1"].summary["test_perplexity"] == LANGUAGE["srste"]["1:8"][1]
    assert not any("checkpoints" in path for path in runs)


@pytest.mark.parametrize(
    ("task", "data", "key", "scale"),
    [("vision", VISION, "test_accuracy", 100.0), ("language", LANGUAGE, "test_perplexity", 1.0)],
)
def test_cells_are_mean_and_sample_std_over_seeds(sweep, task, data, key, scale):
    table = _table(summarize(collect_runs(sweep)), task, key)
    for method, by_pattern in data.items():
        for pattern, values in by_pattern.items():
            rows = table.rows if method == "dense" else [f"ff={pattern}"]
            for row in rows:
                cell = table.cells[row, method]
                assert cell.mean == pytest.approx(np.mean(values) * scale)
                assert cell.std == pytest.approx(np.std(values, ddof=1) * scale)
    assert table.rows == tuple(sorted(table.rows, key=lambda r: -_density(r.removeprefix("ff="))))


def _bold_methods(markdown: list[str], row: str, methods: tuple[str, ...]) -> set[str]:
    line = next(line for line in markdown if line.startswith(f"| {row} |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    return {m for m, cell in zip(methods, cells) if cell.startswith("**")}


@pytest.mark.parametrize(
    ("task", "data", "key", "higher"),
    [("vision", VISION, "test_accuracy", True), ("language", LANGUAGE, "test_perplexity", False)],
)
def test_best_sparse_method_is_bold(sweep, task, data, key, higher):
    table = _table(summarize(collect_runs(sweep)), task, key)
    markdown = render_table(table)
    for pattern in {p for by_pattern in data.values() for p in by_pattern if p}:
        means = {m: np.mean(v[pattern]) for m, v in data.items() if pattern in v}
        best = (max if higher else min)(means, key=means.get)
        assert _bold_methods(markdown, f"ff={pattern}", table.methods) == {best}


def test_cell_text_shows_one_seed_and_unusual_seed_counts(sweep):
    groups = summarize(collect_runs(sweep))
    vision = "\n".join(render_table(_table(groups, "vision", "test_accuracy")))
    srste = np.array(VISION["srste"]["1:16"]) * 100
    assert f"{srste.mean():.1f} ± {srste.std(ddof=1):.1f} (n=2)" in vision
    finetune = "\n".join(render_table(_table(groups, "vision (fine-tune)", "test_accuracy")))
    assert "50.0 ± –" in finetune


def test_decaying_vs_srste_uses_pooled_std_and_spread(sweep):
    groups = summarize(collect_runs(sweep))
    for label, data, higher in (("vision", VISION, True), ("language", LANGUAGE, False)):
        group = next(g for g in groups if g.label == label)
        scale = 100.0 if higher else 1.0
        for comparison in group.comparisons:
            pattern = comparison.pattern.removeprefix("ff=")
            decaying = {m: np.array(v[pattern]) * scale for m, v in data.items() if m[:4] in ("mdgf", "sdgf")}
            best = (max if higher else min)(decaying, key=lambda m: decaying[m].mean())
            a, b = decaying[best], np.array(data["srste"][pattern]) * scale
            pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
            gain = (a.mean() - b.mean()) * (1 if higher else -1)
            spread = max(a.std(ddof=1), b.std(ddof=1))
            verdict = "beats" if gain > spread else "worse" if gain < -spread else "within"
            assert comparison.method == best
            assert comparison.difference == pytest.approx(a.mean() - b.mean())
            assert comparison.pooled_std == pytest.approx(pooled)
            assert comparison.verdict.startswith(verdict)
        assert len(group.comparisons) == 2


def test_groups_keep_protocols_apart(sweep):
    labels = [g.label for g in summarize(collect_runs(sweep))]
    assert labels == ["language", "vision", "vision (fine-tune)"]


def test_report_lists_failed_and_incomplete_runs(sweep):
    text = (sweep / "report.md").read_text()
    assert "2 failed, 1 incomplete" in text
    assert "unreadable summary.json" in next(line for line in text.splitlines() if "`vision/broken`" in line)
    crashed = next(line for line in text.splitlines() if "`vision/crashed`" in line)
    assert "RuntimeError: CUDA out of memory" in crashed and "exit code 1" in crashed
    cut_off = next(line for line in text.splitlines() if "`vision/cut-off`" in line)
    assert "incomplete" in cut_off and "last step logged 7" in cut_off


def test_every_embedded_png_is_valid(sweep):
    import matplotlib.image

    text = (sweep / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(images) >= 12  # 6 per group with diagnostics
    for image in images:
        path = sweep / image
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0


def test_running_twice_gives_the_same_files(sweep):
    def files() -> dict[Path, bytes]:
        return {p.relative_to(sweep): p.read_bytes() for p in sweep.rglob("*") if p.is_file()}

    before = files()
    assert write_report(sweep) == sweep / "report.md"
    assert files() == before


@pytest.mark.parametrize("higher", [True, False])
def test_pareto_frontier_keeps_points_no_cheaper_point_beats(higher):
    rng = np.random.default_rng(0)
    points = [(float(c), float(v), str(i)) for i, (c, v) in enumerate(rng.integers(0, 20, size=(40, 2)))]
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    dominated = {
        p for p in points for q in points if q[0] <= p[0] and (better(q[1], p[1]) or (q[1] == p[1] and q[0] < p[0]))
    }
    frontier = pareto_frontier(points, higher)
    assert {(c, v) for c, v, _ in frontier} == {(c, v) for c, v, _ in set(points) - dominated}
    assert [c for c, _, _ in frontier] == sorted(c for c, _, _ in frontier)


def test_missing_runs_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_summary_only_runs_still_report(tmp_path):
    source = tmp_path / "src"
    _add_runs(source, "vision", {"ste": {"1:16": [0.5, 0.6]}})
    for lines in source.rglob("metrics.jsonl"):
        lines.unlink()
    text = write_report(source).read_text()
    accuracy = np.array([0.5, 0.6]) * 100
    assert f"| ff=1:16 | **{accuracy.mean():.1f} ± {accuracy.std(ddof=1):.1f}** |" in text
    assert "gradient noise: skipped" in text and "mask flip rate: skipped" in text
    assert "plots/vision-vs-sparsity.png" in text  # drawn from the summaries alone


def test_the_decaying_recipe_compared_with_srste_is_chosen_on_validation(tmp_path):
    # mdgf-exp is best on test, sdgf-stepwise on validation: the comparison must not peek at the test split
    scores = {"srste": (0.80, 0.80), "mdgf-exp": (0.90, 0.70), "sdgf-stepwise": (0.75, 0.85)}  # (test, val)
    for method, (test, val) in scores.items():
        for seed in range(2):
            config = {"task": "vision", "method": method, "sparsity": {"ff": "1:16"}, "seed": seed, "steps": STEPS}
            summary = {**config, "metric": "accuracy", "test_accuracy": test + seed / 100, "val_accuracy": val}
            _write_run(tmp_path / method / str(seed), config, summary, [])
    (group,) = summarize(collect_runs(tmp_path))
    (comparison,) = group.comparisons
    assert comparison.method == "sdgf-stepwise"
    assert comparison.difference == pytest.approx((0.75 - 0.80) * 100)
    # seed s adds s/100 to every method: the paired differences are exact, whatever the seeds add
    assert comparison.paired.values == pytest.approx([(0.75 - 0.80) * 100] * 2)
    assert comparison.paired.std == pytest.approx(0.0, abs=1e-9)


def test_pretraining_stages_are_not_counted_as_dense_results(tmp_path):
    for stage in ("dense", "pretrain"):  # the sweep's dense reference and a fine-tune group's first stage
        config = {"task": "vision", "method": "dense", "sparsity": {}, "seed": 0, "steps": STEPS}
        summary = {**config, "metric": "accuracy", "test_accuracy": 0.9, "val_accuracy": 0.9}
        _write_run(tmp_path / "vision" / stage / "seed-0", config, summary, [])
    (group,) = summarize(collect_runs(tmp_path))
    assert [run.path.parent.name for run in group.runs] == ["dense"]
    assert "1 dense pretraining runs" in write_report(tmp_path).read_text()


def test_runs_differing_in_any_setting_land_in_separate_labelled_groups(tmp_path):
    for end in (0.3, 0.7):
        for seed in range(2):
            config = {"task": "language", "method": "mdgf-exp", "sparsity": {"ff": "1:32"}, "seed": seed}
            config |= {"steps": STEPS, "decay_end_fraction": end, "log_every": seed + 1}  # logging never splits
            summary = {**config, "metric": "perplexity", "test_perplexity": 9.0, "val_perplexity": 9.0}
            _write_run(tmp_path / str(end) / str(seed), config, summary, [])
    groups = summarize(collect_runs(tmp_path))
    assert [g.label for g in groups] == ["language, decay_end_fraction=0.3", "language, decay_end_fraction=0.7"]
    assert [len(g.runs) for g in groups] == [2, 2]


def test_references_join_every_group_of_the_mdgf_settings_they_do_not_take(tmp_path):
    def write(folder, method, seed, **settings):
        config = {"task": "language", "method": method, "sparsity": {"ff": "1:32"}, "seed": seed, "steps": STEPS}
        summary = {**config, **settings, "metric": "perplexity", "test_perplexity": 9.0, "val_perplexity": 9.0}
        _write_run(tmp_path / folder / str(seed), {**config, **settings}, summary, [])

    for seed in range(2):
        write("srste", "srste", seed, beta=None, decay_end_fraction=None)
        for end in (0.3, 0.7):
            write(f"mdgf-{end}", "mdgf-exp", seed, beta=None, decay_end_fraction=end)
        write("longer", "srste", seed, steps=2 * STEPS)  # differs in more than the MDGF settings: its own group
    groups = summarize(collect_runs(tmp_path))
    assert [g.label for g in groups] == [
        f"language, decay_end_fraction=0.3, steps={STEPS}",
        f"language, decay_end_fraction=0.7, steps={STEPS}",
        f"language, steps={2 * STEPS}",
    ]
    assert [sorted(r.path.parent.name for r in g.runs) for g in groups] == [
        ["mdgf-0.3", "mdgf-0.3", "srste", "srste"],
        ["mdgf-0.7", "mdgf-0.7", "srste", "srste"],
        ["longer", "longer"],
    ]


def test_overview_puts_every_group_method_and_pattern_on_one_row(sweep):
    text = (sweep / "report.md").read_text()
    overview = text[text.index("## Overview") : text.index("\n## ", text.index("## Overview") + 1)]
    rows = [line.split(" | ") for line in overview.splitlines() if line.startswith("| language |")]
    # dense once, then each sparse method at each of its patterns
    expected = {("–", "dense")} | {(f"ff={p}", m) for m, by in LANGUAGE.items() if m != "dense" for p in by}
    assert {(r[2], r[3]) for r in rows} == expected
    srste = next(r for r in rows if r[2:4] == ["ff=1:8", "srste"])
    values = LANGUAGE["srste"]["1:8"]
    mean, std = np.mean(values), np.std(values, ddof=1)
    assert srste[4] == f"{0.99 * mean:.2f} ± {0.99 * std:.2f}"  # validation (0.99 x test in these runs)
    assert srste[5] == f"{mean:.2f} ± {std:.2f}" and srste[6] == "2 |"


def test_diagnostics_table_reduces_the_sparse_window_per_run_then_over_seeds(tmp_path):
    from nmflow.app.report.tables import diagnostics_table

    rng = np.random.default_rng(0)
    expected = {}
    for method in ("srste", "mdgf-exp"):
        per_seed = []
        for seed in range(3):
            config = {"task": "vision", "method": method, "sparsity": {"ff": "1:16"}, "seed": seed, "steps": STEPS}
            summary = {**config, "metric": "accuracy", "test_accuracy": 0.9, "val_accuracy": 0.9}
            summary["phases"] = {"dense": [0, 10], "sparse": [10, 30], "finetune": [30, STEPS]}
            values = rng.uniform(1, 2, STEPS)
            lines = [{"step": s + 1, "grad_abs_var": {"ff": float(values[s])}} for s in range(STEPS)]
            per_seed.append(values[10:30].mean())  # steps 11..30: the 20 steps of the sparse window
            _write_run(tmp_path / method / str(seed), config, summary, lines)
        expected[method] = f"{np.mean(per_seed):.3g} ± {np.std(per_seed, ddof=1):.2g}"
    (group,) = summarize(collect_runs(tmp_path))
    table = "\n".join(diagnostics_table(group))
    for method, text in expected.items():
        assert f"| {method} | {text} |" in table


def test_schedule_plot_shows_mdgf_d_in_every_phase(tmp_path):
    from nmflow.app.report.plots import MDGF_D_BY_PHASE, _PlotData, _step_series

    phases = [("dense", None), ("sparse", 0.5), ("sparse", 0.25), ("finetune", None)]
    lines = [{"step": i + 1, "phase": phase, "D": d} for i, (phase, d) in enumerate(phases)]
    config = {"task": "language", "method": "mdgf-exp", "sparsity": {"ff": "1:32"}, "seed": 0, "steps": 4}
    summary = {**config, "metric": "perplexity", "test_perplexity": 9.0, "val_perplexity": 9.0}
    _write_run(tmp_path / "run", config, summary, lines)
    (group,) = summarize(collect_runs(tmp_path))
    data = _PlotData(group, {r.path: read_metrics(r.path) for r in group.runs}, "ff=1:32")
    assert _step_series(data, list(group.runs), "D", smooth=False)["mdgf-exp"] == ([2, 3], [0.5, 0.25])
    filled = _step_series(data, list(group.runs), "D", smooth=False, by_phase=MDGF_D_BY_PHASE)
    assert filled["mdgf-exp"] == ([1, 2, 3, 4], [1.0, 0.5, 0.25, 0.0])
