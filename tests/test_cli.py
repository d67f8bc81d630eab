"""`nmflow train`, in process and as the installed console command, with tiny runs (tens of steps)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli

import nmflow
from nmflow.app.cli import main
from nmflow.app.config import TrainConfig, read_config_file
from nmflow.app.data import load_digits_splits
from nmflow.app.tasks import VIT_CONFIG
from nmflow.app.train import train

TINY_STEPS = 30
OUTPUT_FILES = {
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "config.json",
    "checkpoints",
    "tensorboard",
}
FF_LAYERS = [f"vit.layers.{i}.mlp.{fc}" for i in range(VIT_CONFIG["num_hidden_layers"]) for fc in ("fc1", "fc2")]
FF_WEIGHTS = VIT_CONFIG["num_hidden_layers"] * 2 * VIT_CONFIG["hidden_size"] * VIT_CONFIG["intermediate_size"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The default recipe (mdgf-exp, ff=1:16) for 30 steps, every step logged."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    config = TrainConfig(steps=TINY_STEPS, log_every=1, eval_every=10, out=str(out))
    return config, train(config, verbose=False), out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_every_output_file(tiny_run):
    _, summary, out = tiny_run
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert json.loads((out / "summary.json").read_text()) == summary


def test_config_yaml_holds_the_resolved_config_and_can_be_given_back(tiny_run):
    config, _, out = tiny_run
    raw = yaml.safe_load((out / "config.yaml").read_text())
    assert raw["nmflow_version"] == nmflow.__version__
    assert raw["out"] == str(out)
    assert raw["sparsity"] == {"ff": "1:16"}
    assert (raw["decay_end_value"], raw["decay_fraction"]) == (0.01, 0.25)  # the recipe defaults, spelled out
    reloaded = TrainConfig.from_dict(read_config_file(out / "config.yaml"))
    assert reloaded.recipe() == config.recipe()
    assert (reloaded.steps, reloaded.seed, reloaded.lr) == (config.steps, config.seed, config.lr)


def test_metrics_follow_the_phases_and_schedules(tiny_run):
    config, _, out = tiny_run
    lines = read_metrics(out)
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == list(range(1, TINY_STEPS + 1))
    # Recipe defaults: 5% dense, 15% fine-tuning, exponential D reaching 0.01 25% of the steps after the dense phase.
    dense_steps, finetune_start = round(0.05 * TINY_STEPS), TINY_STEPS - round(0.15 * TINY_STEPS)
    beta = math.log(100) / round(0.25 * TINY_STEPS)
    for line in train_lines:
        step = line["step"] - 1  # the schedule step of this line's forward pass
        if step < dense_steps:
            assert (line["phase"], line["D"], line["patterns"]) == ("dense", None, {"ff": "dense"})
        elif step < finetune_start:
            assert (line["phase"], line["patterns"]) == ("sparse", {"ff": "1:16"})
            assert line["D"] == pytest.approx(math.exp(-beta * (step - dense_steps)))
        else:
            assert (line["phase"], line["D"], line["patterns"]) == ("finetune", None, {"ff": "1:16"})
        assert math.isfinite(line["loss"])
    # Warmup over round(5% of 30) = 2 steps, then a cosine from lr down to lr / 10 at the last step.
    lrs = [line["lr"] for line in train_lines]
    assert lrs[:3] == pytest.approx([config.lr / 2, config.lr, config.lr])
    assert lrs[-1] == pytest.approx(config.lr / 10)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))

    evaluations = [line for line in lines if "val_accuracy" in line]
    assert [e["step"] for e in evaluations] == [10, 20, TINY_STEPS]
    assert evaluations[-1]["finalized"] is True
    assert not any("test_accuracy" in line for line in lines)  # the test split is for the summary only


def test_summary_reports_exact_patterns_and_counts(tiny_run):
    _, summary, _ = tiny_run
    assert summary["phases"] == {"dense": [0, 2], "sparse": [2, 26], "finetune": [26, TINY_STEPS]}
    assert [r["layer"] for r in summary["layers"]] == FF_LAYERS
    assert {(r["target"], r["realized"]) for r in summary["layers"]} == {("1:16", "1:16")}
    assert summary["sparsified_weights"] == {"kept": FF_WEIGHTS // 16, "total": FF_WEIGHTS}
    model = nmflow_model(summary["out"])
    total = sum(p.numel() for p in model.parameters())
    assert summary["model_parameters"] == {"nonzero": total - FF_WEIGHTS + FF_WEIGHTS // 16, "total": total}
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_examples"] == 270  # 15% of 1,797


def nmflow_model(out: str):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(out)


def test_saved_model_loads_back_with_its_zeros_and_accuracy(tiny_run):
    _, summary, out = tiny_run
    model = nmflow_model(str(out)).eval()
    modules = dict(model.named_modules())
    for name in FF_LAYERS:
        weight = modules[name].weight
        assert nmflow.is_nm(weight, 1, 16)
        assert int(weight.count_nonzero()) == weight.numel() // 16
    test = load_digits_splits(data_seed=0).test
    with torch.no_grad():
        predictions = model(pixel_values=test.images).logits.argmax(-1)
    assert (predictions == test.labels).float().mean().item() == pytest.approx(summary["test_accuracy"])


def test_same_seed_gives_the_same_run(tiny_run, tmp_path):
    config, summary, out = tiny_run
    again = train(TrainConfig(steps=TINY_STEPS, log_every=1, eval_every=10, out=str(tmp_path)), verbose=False)
    for key in ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "model_parameters"):
        assert again[key] == summary[key]
    assert [m.get("loss") for m in read_metrics(tmp_path)] == [m.get("loss") for m in read_metrics(out)]


def test_dense_method_trains_the_reference_without_masks(tmp_path):
    summary = train(TrainConfig(method="dense", steps=5, out=str(tmp_path)), verbose=False)
    assert summary["layers"] == []
    assert summary["phases"] == {"dense": [0, 5]}
    assert {line["phase"] for line in read_metrics(tmp_path) if "phase" in line} == {"dense"}
    assert summary["model_parameters"]["nonzero"] == summary["model_parameters"]["total"]


def test_config_file_with_a_flag_overriding_it(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    # Unquoted 1:8 and 2e-3 must read as a pattern and a number (PyYAML alone gives 68 and a string).
    config_file.write_text("method: ste\nsparsity:\n  ff: 1:8\n  qk: 1:4\nsteps: 12\nlr: 2e-3\nlog_every: 4\n")
    out = tmp_path / "run"
    status, err = run_cli(["train", "--config", str(config_file), "--steps", "16", "--out", str(out)], capsys)
    assert (status, err) == (0, "")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["steps"]) == ("ste", 16)
    assert summary["sparsity"] == {"ff": "1:8", "qk": "1:4"}
    realized = {(r["key"], r["role"], r["realized"]) for r in summary["layers"]}
    assert realized == {("ff", "ff", "1:8"), ("qk", "q", "1:4"), ("qk", "k", "1:4")}
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 2e-3
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [4, 8, 12, 16]


def test_exclude_leaves_the_layers_it_names_dense_and_is_recorded(tmp_path, capsys, tiny_run):
    out = tmp_path / "run"
    status, err = run_cli(["train", "--steps", "4", "--exclude", r"vit\.layers\.0\..*", "--out", str(out)], capsys)
    assert (status, err) == (0, "")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["layer"] for r in summary["layers"]] == [name for name in FF_LAYERS if ".layers.0." not in name]
    assert yaml.safe_load((out / "config.yaml").read_text())["exclude"] == [r"vit\.layers\.0\..*"]
    assert "exclude" not in yaml.safe_load((tiny_run[2] / "config.yaml").read_text())  # as before exclude existed
    modules = dict(nmflow_model(str(out)).named_modules())
    for name in FF_LAYERS:
        weight = modules[name].weight
        assert nmflow.is_nm(weight, 1, 16) == (".layers.0." not in name)


@pytest.mark.parametrize(
    ("config_text", "flags", "culprit"),
    [
        ("stepz: 10\n", [], "stepz"),
        ("steps: ten\n", [], "steps"),
        ("method: dgf\n", [], "dgf"),
        ("", ["--method", "dgf"], "dgf"),
        ("", ["--sparsity", "ff-1:16"], "ff-1:16"),
        ("", ["--sparsity", "ff=16:1"], "16:1"),
        ("", ["--sparsity", "mlp=1:16"], "mlp"),
        ("", ["--sparsity", "ff=1:128"], "1:128"),  # M larger than the 64 inputs of fc1
        ("", ["--exclude", "vit.nothing"], "vit.nothing"),
        ("", ["--exclude", "(["], "(["),
    ],
)
def test_bad_input_exits_2_naming_the_culprit_and_writes_nothing(tmp_path, capsys, config_text, flags, culprit):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(config_text)
    out = tmp_path / "run"
    status, err = run_cli(["train", "--config", str(config_file), "--out", str(out), *flags], capsys)
    assert status == 2
    assert err.startswith("nmflow: error: ") and culprit in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("config_text", "flags", "message", "names_file"),
    [
        ("lr_rate: 0.01\n", [], "unknown config key 'lr_rate'; known keys: task, data", True),
        ("steps: ten\n", [], "steps must be a whole number, got 'ten'", True),
        ("method: dgf\n", [], "unknown method 'dgf'", True),
        ("dense_steps: 50\n", ["--steps", "20"], "dense_steps and finetune_steps must be >= 0", True),  # together
        ("lr: 0.01\n", ["--steps", "0"], "steps must be >= 1, got 0", False),  # the flag alone is wrong
        ("steps: 0\n", ["--steps", "0"], "steps must be >= 1, got 0", False),  # the file's value is not used
    ],
)
def test_a_bad_config_file_is_named_and_a_bad_flag_is_not(tmp_path, capsys, config_text, flags, message, names_file):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(config_text)
    out = tmp_path / "run"
    status, err = run_cli(["train", "--config", str(config_file), "--out", str(out), *flags], capsys)
    assert status == 2 and message in err and err.count("\n") == 1
    prefix = f"nmflow: error: config file {config_file}: " if names_file else "nmflow: error: "
    assert err.startswith(prefix + message) and (str(config_file) in err) == names_file
    assert not out.exists()


def test_non_empty_output_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, err = run_cli(["train", "--steps", "2", "--out", str(out)], capsys)
    assert status == 2
    assert err == f"nmflow: error: output folder {out} is not empty; choose another --out or pass --overwrite\n"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    status, _ = run_cli(["train", "--steps", "2", "--out", str(out), "--overwrite"], capsys)
    assert status == 0
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES | {"notes.txt"}


def test_help_offers_a_flag_for_every_config_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert (f"--{f.name.replace('_', '-')}" in text) == f.metadata.get("cli", True), f.name


def test_console_command_runs_quietly(tmp_path):
    """The installed ``nmflow`` script: a summary on stdout, nothing on stderr, no progress bar in a pipe."""
    command = Path(sys.executable).with_name("nmflow")
    out = tmp_path / "run"
    result = subprocess.run(
        [str(command), "train", "--steps", "20", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "test accuracy" in result.stdout and result.stdout.count(" exact") == len(FF_LAYERS)
    assert "step/s" not in result.stdout  # tqdm stays silent when stdout is not a terminal
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES


def test_cli_and_train_keep_heavy_imports_out_of_import_time():
    heavy = "{'transformers', 'sklearn', 'yaml'}"
    code = f"import sys, nmflow.app.cli, nmflow.app.train; print(sorted({heavy} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
