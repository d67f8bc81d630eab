"""nmflow sweep: the spec is checked before any run, runs land in their folders, finished ones are skipped,
a crashed run is marked failed, and the report is written from the folder."""

import json

import pytest
import yaml
from helpers import run_cli

from nmflow.app.sweep import plan_sweep
from nmflow.core.errors import ConfigError

TINY_LANGUAGE = {"model": {"n_embd": 32, "n_head": 2, "n_layer": 1}, "block_size": 16, "batch_size": 8}
SHARED = {"log_every": 2, "eval_every": 3, "save_every": 3, "tensorboard": False}


def _write(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_the_plan_covers_the_grid_once_per_run():
    spec = {
        "seeds": [0, 1],
        "methods": ["dense", "srste", "mdgf-exp"],
        "patterns": ["1:8", {"ff": "1:16", "qk": "1:8"}],
        "tasks": {"vision": {"steps": 10}, "lm-ft": {"task": "language", "pretrain_steps": 5, **TINY_LANGUAGE}},
    }
    runs = plan_sweep(spec)
    names = [run.name for run in runs]
    assert len(names) == len(set(names))
    # per task and seed: dense once, 2 methods x 2 patterns; the fine-tune task adds its pretraining run
    assert len(runs) == 2 * (1 + 2 * 2) + 2 * (1 + 1 + 2 * 2)
    assert "vision/ff_1-16+qk_1-8/mdgf-exp/seed-1" in names
    assert "vision/dense/seed-0" in names
    pretrain = [run for run in runs if run.name.startswith("lm-ft/pretrain/")]
    assert [run.config["method"] for run in pretrain] == ["dense", "dense"]
    assert {run.config["steps"] for run in pretrain} == {5}
    continued = [run for run in runs if run.name.startswith("lm-ft/") and run not in pretrain]
    assert all(run.after == f"lm-ft/pretrain/seed-{run.config['seed']}" for run in continued)
    assert max(names.index(run.name) for run in pretrain) < min(names.index(run.name) for run in continued)


def test_mdgf_settings_reach_the_mdgf_runs_only():
    spec = {
        "seeds": [0],
        "methods": ["srste", "mdgf-exp", "mdgf-linear"],
        "patterns": ["1:8"],
        "config": {"decay_end_fraction": 0.5},
        "tasks": {"vision": {"steps": 40}, "lm-ft": {"task": "language", "pretrain_steps": 5, **TINY_LANGUAGE}},
    }
    configs = {run.name: run.config for run in plan_sweep(spec)}
    for name in ("vision/ff_1-8/mdgf-exp/seed-0", "lm-ft/ff_1-8/mdgf-linear/seed-0"):
        assert configs[name]["decay_end_fraction"] == 0.5
    for name in ("vision/ff_1-8/srste/seed-0", "lm-ft/ff_1-8/srste/seed-0", "lm-ft/pretrain/seed-0"):
        assert "decay_end_fraction" not in configs[name]
    # a task that asks for an MDGF setting itself but runs no MDGF method is a mistake
    spec["tasks"]["vision"] |= {"methods": ["srste"], "beta": 0.01}
    with pytest.raises(ConfigError, match=r"tasks\.vision: beta: only the mdgf-\* methods take it"):
        plan_sweep(spec)


def test_every_problem_of_a_spec_is_listed_before_any_run(tmp_path):
    spec = {
        "seeds": [0, -1],
        "methods": ["srste", "magic"],
        "patterns": ["1:16", "3:2", {"ff": "1:300"}],
        "colour": "blue",
        "config": {"steps": 10, "method": "ste"},
        "tasks": {"vision": {"lr": 1e-3}, "audio": {}, "lm": {"task": "language", "wings": 2}},
    }
    with pytest.raises(ConfigError) as caught:
        plan_sweep(spec)
    message = str(caught.value)
    for culprit in ("'colour'", "'magic'", "'3:2'", "seed -1", "'audio'", "'wings'", "sweep sets method", "1:300"):
        assert culprit in message, culprit
    assert not any(tmp_path.iterdir())


def test_a_recipe_that_does_not_fit_the_model_is_refused_up_front():
    spec = {"seeds": [0], "methods": ["ste"], "patterns": ["1:128"], "tasks": {"vision": {"steps": 10}}}
    with pytest.raises(ConfigError, match=r"(?s)vision/ff_1-128/ste/seed-0: .*input size 64, pattern 1:128"):
        plan_sweep(spec)  # the ViT's FF input sizes (64, 256) are not multiples of 128


def test_smoke_sweep_end_to_end(tmp_path, capsys):
    spec = _write(
        tmp_path / "sweep.yaml",
        {
            "seeds": [0],
            "methods": ["dense", "srste", "mdgf-exp"],
            "patterns": ["1:8"],
            "config": SHARED,
            "tasks": {
                "vision": {"steps": 6},
                "language": {"steps": 6, **TINY_LANGUAGE},
                "broken": {"task": "vision", "steps": 6, "lr": 1e30, "methods": ["ste"]},  # diverges: NaN weights
            },
        },
    )
    out = tmp_path / "runs"
    status, _ = run_cli(["sweep", str(spec), "--out", str(out), "--jobs", "2"], capsys)
    assert status == 1  # one run failed
    for name in ("vision/ff_1-8/srste/seed-0", "language/ff_1-8/mdgf-exp/seed-0", "language/dense/seed-0"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 6
        assert not (out / name / "checkpoints").exists()  # a finished run keeps its model, not its checkpoints
        assert (out / name / "metrics.jsonl").is_file()
    failed = json.loads((out / "broken/ff_1-8/ste/seed-0/failed.json").read_text())
    assert failed["returncode"] != 0 and "NaN" in failed["error"]

    finished = out / "vision/ff_1-8/srste/seed-0/summary.json"
    written = finished.stat().st_mtime_ns
    status, _ = run_cli(["sweep", str(spec), "--out", str(out), "--jobs", "2"], capsys)
    assert status == 1  # the broken run was retried and failed again
    assert finished.stat().st_mtime_ns == written  # finished runs were skipped

    status, _ = run_cli(["report", str(out)], capsys)
    assert status == 0
    report = (out / "report.md").read_text()
    assert "broken/ff_1-8/ste/seed-0" in report  # the crashed run is listed, not dropped
    for png in sorted((out / "plots").glob("*.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_changed_spec_does_not_reuse_finished_runs(tmp_path, capsys):
    spec = {"seeds": [0], "methods": ["ste"], "patterns": ["1:8"], "config": SHARED, "tasks": {"vision": {"steps": 3}}}
    out = tmp_path / "runs"
    assert run_cli(["sweep", str(_write(tmp_path / "a.yaml", spec)), "--out", str(out)], capsys)[0] == 0
    spec["tasks"]["vision"]["lr"] = 0.01
    status, err = run_cli(["sweep", str(_write(tmp_path / "b.yaml", spec)), "--out", str(out)], capsys)
    assert status == 2 and "other settings" in err
