"""`nmflow sweep SPEC.yaml`: train a grid of tasks x methods x patterns x seeds, several runs at once.

A spec names the grid; every key is checked, and every run's config and recipe validated against its model,
before the first run starts::

    seeds: [0, 1, 2]
    methods: [dense, srste, mdgf-exp]
    patterns: ["1:16", "1:32"]          # a bare N:M sparsifies the FF layers; or {ff: "1:16", qk: "1:8"}
    config: {log_every: 20}             # nmflow train keys shared by every run
    tasks:
      vision: {steps: 1000}             # a task name, with its own train keys
      language: {steps: 400, batch_size: 32}
      language-finetune:                # any name, with `task:` saying which task it runs
        task: language
        pretrain_steps: 400             # the fine-tune protocol: a dense run first, every run continues from it
        steps: 200
        methods: [dense, srste]         # seeds, methods and patterns may be given per task too

The mdgf-* settings (``beta``, ``decay_fraction``, ``decay_end_fraction``) reach only the mdgf-* runs of a
grid; a task that sets one itself must run an mdgf-* method.

Each run has its own folder, ``OUT/<task name>/<pattern>/<method>/seed-<s>`` (the dense method once per seed,
``OUT/<task name>/dense/seed-<s>``), holding ``run.yaml`` (what the sweep asked for), ``log.txt`` and what
`nmflow train` writes. SweepRun again, the sweep skips finished runs, resumes interrupted ones from their newest
checkpoint and retries failed ones; a finished run's checkpoints are deleted (its model stays). A run that
fails gets a ``failed.json`` (exit status and the end of its log), which `nmflow report` lists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from nmflow.core.errors import ConfigError, NmflowError, is_whole_number
from nmflow.core.masks import NMPattern
from nmflow.core.recipes import MDGF_ONLY_SETTINGS, METHODS, takes_decay

__all__ = ["SweepRun", "plan_sweep", "run_sweep"]

GRID_KEYS = ("seeds", "methods", "patterns")
SPEC_KEYS = (*GRID_KEYS, "config", "tasks")
TASK_KEYS = (*GRID_KEYS, "task", "pretrain_steps")
RUN_OWNED = ("method", "sparsity", "seed", "out", "init_from")  # the sweep sets these per run
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class SweepRun:
    """One run of the grid: its folder (relative to the sweep's), its train config, and the run it starts from."""

    name: str
    config: dict[str, Any]
    after: str | None = None  # the pretraining run this one continues from
    pattern_index: int = 0  # position of its pattern in the spec's list


def read_spec(path: str | Path) -> dict[str, Any]:
    from nmflow.app.config import read_config_file

    try:
        return read_config_file(path)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config file", "sweep spec", 1)) from None


def plan_sweep(spec: Mapping[str, Any]) -> list[SweepRun]:
    """Every run of ``spec``, pretraining runs first; raises one `ConfigError` listing all that is wrong."""
    from nmflow.app.config import TrainConfig
    from nmflow.app.tasks import TASKS

    problems: list[str] = []
    train_keys = {f.name for f in fields(TrainConfig)} - set(RUN_OWNED)
    problems += [f"unknown key {k!r} (known: {', '.join(SPEC_KEYS)})" for k in sorted(set(spec) - set(SPEC_KEYS))]
    shared = spec.get("config") or {}
    if not isinstance(shared, Mapping):
        problems.append("config must be a mapping of nmflow train keys")
        shared = {}
    problems += [f"config: {_key_problem(k, train_keys)}" for k in sorted(set(shared) - train_keys)]
    tasks = spec.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        problems.append(f"tasks must map task names to their settings, e.g. {{vision: {{steps: 1000}}}} ({TASKS})")
        tasks = {}

    runs: list[SweepRun] = []
    for label, settings in tasks.items():
        where = f"tasks.{label}"
        if settings is not None and not isinstance(settings, Mapping):
            problems.append(f"{where}: must map nmflow train keys to values, e.g. {{steps: 1000}}, not {settings!r}")
            continue
        settings = dict(settings or {})
        bad_keys = sorted(set(settings) - set(TASK_KEYS) - train_keys)
        problems += [f"{where}: {_key_problem(k, train_keys | set(TASK_KEYS))}" for k in bad_keys]
        task = settings.pop("task", label)
        if task not in TASKS:
            problems.append(f"{where}: unknown task {task!r} (known: {', '.join(TASKS)}; or give task: <name>)")
            continue
        grid = {key: settings.pop(key, spec.get(key)) for key in GRID_KEYS}
        pretrain_steps = settings.pop("pretrain_steps", None)
        seeds, methods, patterns = _check_grid(grid, where, problems)
        mdgf_only = [k for k in MDGF_ONLY_SETTINGS if k in settings]
        if mdgf_only and not any(takes_decay(m) for m in methods):
            problems.append(f"{where}: {', '.join(mdgf_only)}: only the mdgf-* methods take it, and the task runs none")
        base = {**shared, **{k: v for k, v in settings.items() if k not in bad_keys}, "task": task}
        for seed in seeds:
            after = None
            if pretrain_steps is not None:
                after = f"{label}/pretrain/seed-{seed}"
                pretrain = {**_for_method(base, "dense"), "steps": pretrain_steps, "seed": seed}
                runs.append(SweepRun(after, {**pretrain, "sparsity": patterns[0] if patterns else {}}))
            for method in methods:
                for index, sparsity in enumerate(patterns[:1] if method == "dense" else patterns):
                    folder = "dense" if method == "dense" else f"{_pattern_label(sparsity)}/{method}"
                    config = {**_for_method(base, method), "sparsity": sparsity, "seed": seed}
                    runs.append(SweepRun(f"{label}/{folder}/seed-{seed}", config, after, index))
    problems += _check_runs(runs)
    if problems:
        raise ConfigError("the sweep spec is not valid:\n  " + "\n  ".join(problems))
    return sorted(runs, key=_order)


def _for_method(config: Mapping[str, Any], method: str) -> dict[str, Any]:
    """``config`` for a run of ``method``, without the settings only the mdgf-* methods take."""
    dropped = () if takes_decay(method) else MDGF_ONLY_SETTINGS
    return {**{k: v for k, v in config.items() if k not in dropped}, "method": method}


def _order(run: SweepRun) -> tuple:
    """Pretraining, then the dense references, then pattern by pattern in the spec's order, every task and seed
    of a pattern together: a sweep stopped early has whole patterns, with all their seeds, to report."""
    return (run.config["method"] != "dense", run.after is not None, run.pattern_index)


def _key_problem(key: str, known: set[str]) -> str:
    owned = f" (the sweep sets {key} per run)" if key in RUN_OWNED else ""
    return f"unknown key {key!r}{owned}" if owned else f"unknown key {key!r}; known: {', '.join(sorted(known))}"


def _check_grid(grid: Mapping[str, Any], where: str, problems: list[str]) -> tuple[list, list, list]:
    seeds, methods, patterns = (grid[key] if isinstance(grid[key], list) else None for key in GRID_KEYS)
    for key, values in zip(GRID_KEYS, (seeds, methods, patterns)):
        if not values:
            problems.append(f"{where}: {key} must be a non-empty list (here or at the top of the spec)")
    seeds = [s for s in seeds or [] if is_whole_number(s)] or []
    problems += [f"{where}: seed {s!r} is not a whole number >= 0" for s in grid["seeds"] or [] if s not in seeds]
    unknown = [m for m in methods or [] if m not in METHODS]
    if unknown:
        problems.append(f"{where}: unknown methods {', '.join(map(repr, unknown))} (known: {', '.join(METHODS)})")
    checked = []
    for pattern in patterns or []:
        sparsity = {"ff": pattern} if isinstance(pattern, str) else pattern
        try:
            if not isinstance(sparsity, Mapping) or not sparsity:
                raise ConfigError("give N:M or a mapping of roles to N:M")
            for value in sparsity.values():
                NMPattern.parse(value)
            checked.append(dict(sparsity))
        except ConfigError as err:
            problems.append(f"{where}: pattern {pattern!r}: {err}")
    return seeds, [m for m in methods or [] if m in METHODS], checked


def _check_runs(runs: list[SweepRun]) -> list[str]:
    """Each run's config and recipe, checked against its task's model (one model built per task and overrides)."""
    from nmflow.app.config import TrainConfig
    from nmflow.app.tasks import build_task
    from nmflow.core.targets import resolve_targets

    problems, models = [], {}
    for run in runs:
        try:
            config = TrainConfig.from_dict(run.config)
            key = json.dumps([config.task, config.data, config.model, config.block_size, config.image_size])
            if key not in models:
                task = build_task(
                    config.task,
                    data=config.data,
                    data_seed=config.data_seed,
                    model=config.model,
                    device="cpu",
                    block_size=config.block_size,
                    image_size=config.image_size,
                )
                models[key] = task.build_model()
            resolve_targets(models[key], config.recipe())
        except (ConfigError, NmflowError) as err:
            problem = f"{run.name}: {err}"
            if problem not in problems:
                problems.append(problem)
    return problems


def _pattern_label(sparsity: Mapping[str, str]) -> str:
    """``{"ff": "1:16", "qk": "1:8"}`` -> ``ff_1-16+qk_1-8``: a folder name on every file system."""
    return "+".join(f"{role}_{pattern.replace(':', '-')}" for role, pattern in sparsity.items()).replace("re:", "re-")


# ----------------------------------------------------------------------------- running
def run_sweep(spec_path: str | Path, out: str | Path, jobs: int | None = None, verbose: bool = True) -> dict[str, int]:
    """Run every unfinished run of the spec into ``out``, ``jobs`` at a time; returns counts by outcome."""
    spec = read_spec(spec_path)
    runs = plan_sweep(spec)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep output {out} is a file")
    changed = [run.name for run in runs if _requested(out / run.name) not in (None, _with_start(run, out))]
    if changed:
        raise ConfigError(
            f"{len(changed)} runs in {out} were started with other settings ({', '.join(changed[:3])}...); "
            "give the sweep another output folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, out / "sweep.yaml")
    jobs = jobs or len(os.sched_getaffinity(0))
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")

    outcome = {run.name: "finished" for run in runs if (out / run.name / "summary.json").is_file()}
    for name in outcome:  # a run that finished after its sweep was stopped still holds its checkpoints
        shutil.rmtree(out / name / "checkpoints", ignore_errors=True)
    pending = [run for run in runs if run.name not in outcome]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    say = print if verbose else lambda *_: None
    say(f"nmflow sweep: {len(runs)} runs, {len(outcome)} already finished, {len(pending)} to go, {jobs} at a time")
    sweep_started, ended_here = time.perf_counter(), 0
    try:
        while pending or running:
            for name, (process, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                outcome[name] = _collect(out / name, process.returncode)
                ended_here += 1
                left = (time.perf_counter() - sweep_started) / ended_here * (len(pending) + len(running))
                line = _progress_line(len(outcome), len(runs), name, outcome[name], out / name, started)
                say(f"{line}  (about {left / 60:.0f} min left)" if pending or running else line)
            for run in list(pending):
                if len(running) >= jobs:
                    break
                if run.after is not None and run.after not in outcome:
                    continue  # its pretraining run is still going
                pending.remove(run)
                if run.after is not None and outcome[run.after] != "finished":
                    outcome[run.name] = _fail(out / run.name, f"its pretraining run {run.after} failed")
                    say(_progress_line(len(outcome), len(runs), run.name, "failed", out / run.name, None))
                    continue
                running[run.name] = (_start(out, run), time.perf_counter())
            time.sleep(0.2)
    finally:
        for process, _ in running.values():  # interrupted: the runs resume from their checkpoints next time
            process.terminate()
    counts = {state: list(outcome.values()).count(state) for state in ("finished", "failed")}
    say(f"nmflow sweep: {counts['finished']} finished, {counts['failed']} failed; nmflow report {out}")
    return counts


def _requested(folder: Path) -> dict[str, Any] | None:
    path = folder / "run.yaml"
    return read_spec(path) if path.is_file() else None


def _with_start(run: SweepRun, out: Path) -> dict[str, Any]:
    """The run's config as `nmflow train` takes it: a continued run names the folder of its pretraining run."""
    return run.config if run.after is None else {**run.config, "init_from": str(out / run.after)}


def _start(out: Path, run: SweepRun) -> subprocess.Popen:
    from nmflow.app.config import write_yaml

    folder = out / run.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed.json").unlink(missing_ok=True)
    write_yaml(folder / "run.yaml", _with_start(run, out))
    command = [sys.executable, "-m", "nmflow", "train"]
    if (folder / "checkpoints").is_dir() and (folder / "config.yaml").is_file():
        command += ["--resume", str(folder)]
    else:
        command += ["--config", str(folder / "run.yaml"), "--out", str(folder), "--overwrite"]
    with open(folder / "log.txt", "a") as log:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _collect(folder: Path, returncode: int) -> str:
    if returncode == 0 and (folder / "summary.json").is_file():
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return "finished"
    tail = (folder / "log.txt").read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    (folder / "failed.json").write_text(json.dumps({"returncode": returncode, "error": "\n".join(tail)}, indent=2))
    return "failed"


def _fail(folder: Path, reason: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed.json").write_text(json.dumps({"returncode": None, "error": reason}, indent=2))
    return "failed"


def _progress_line(done: int, total: int, name: str, state: str, folder: Path, started: float | None) -> str:
    line = f"[{done}/{total}] {state:<8} {name}"
    if state == "finished":
        summary = json.loads((folder / "summary.json").read_text())
        metric = summary["metric"]
        score = summary[f"test_{metric}"]
        line += f"  test {metric} {score:.1%}" if metric == "accuracy" else f"  test loss {summary['test_loss']:.4f}"
    if started is not None:
        line += f"  {time.perf_counter() - started:.0f} s"
    return line
