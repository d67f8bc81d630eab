"""`nmflow train` checkpoints: exact resume after SIGKILL, atomic saves, keep-last-K, damaged files, TensorBoard."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from nmflow.app import checkpoint
from nmflow.app.config import TrainConfig
from nmflow.app.train import train

STEPS = 30
PHASES = {"dense": (0, 10), "sparse": (10, 20), "finetune": (20, 30)}  # dense_steps=10, finetune_steps=10
SAVE_EVERY = 3
RUN_FLAGS = ["--method", "mdgf-exp", "--steps", str(STEPS), "--dense-steps", "10", "--finetune-steps", "10"]
RUN_FLAGS += ["--save-every", str(SAVE_EVERY), "--log-every", "1", "--eval-every", "7", "--batch-size", "32"]
# Runs `nmflow train` and kills its own process with SIGKILL as step KILL_AT (0-based) begins.
KILLING_RUNNER = """
import os, signal, sys
import nmflow.app.train
kill_at, learning_rate = int(sys.argv[1]), nmflow.app.train.learning_rate
def learning_rate_or_die(step, config):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return learning_rate(step, config)
nmflow.app.train.learning_rate = learning_rate_or_die
from nmflow.app.cli import main
main(sys.argv[2:])
"""


def config(out: Path, **changes) -> TrainConfig:
    base = dict(steps=STEPS, dense_steps=10, finetune_steps=10, save_every=SAVE_EVERY, log_every=1, eval_every=7)
    return TrainConfig(**{**base, "batch_size": 32, "out": str(out), **changes})


def step_folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(config(out), verbose=False)
    return out


@pytest.mark.parametrize("phase", PHASES)
def test_a_killed_run_resumes_to_the_same_weights_and_metrics(uninterrupted, tmp_path, capsys, phase):
    first, stop = PHASES[phase]
    kill_at = random.Random(phase).randrange(max(first, SAVE_EVERY) + 1, stop)  # after a checkpoint, inside the phase
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLING_RUNNER, str(kill_at), "train", *RUN_FLAGS, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert not (out / "model.safetensors").exists()
    last_saved = kill_at // SAVE_EVERY * SAVE_EVERY
    assert step_folders(out)[-1] == f"step-{last_saved}"

    status, err = run_cli(["train", "--resume", str(out)], capsys)
    assert (status, err) == (0, "")
    expected, resumed = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(resumed) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert (out / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_resume_refuses_flags_that_would_change_the_run(uninterrupted, capsys):
    status, err = run_cli(["train", "--resume", str(uninterrupted), "--steps", "40"], capsys)
    assert status == 2
    assert "steps would change it" in err


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    calls = []

    def save_file_failing_on_the_second_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        save_file(tensors, path)

    original = checkpoint.save_checkpoint
    monkeypatch.setattr(
        "nmflow.app.train.save_checkpoint",
        lambda *args, **kwargs: original(*args, **kwargs, write_model=save_file_failing_on_the_second_save),
    )
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        train(config(out), verbose=False)
    assert step_folders(out) == [f"step-{SAVE_EVERY}"]  # no temporary folder left, the first save untouched
    saved = checkpoint.read_checkpoint(out / "checkpoints" / f"step-{SAVE_EVERY}")
    assert saved.step == SAVE_EVERY


@pytest.mark.parametrize("keep", [1, 3])
def test_only_the_newest_checkpoints_are_kept(tmp_path, keep):
    out = tmp_path / "run"
    train(config(out, steps=10, dense_steps=2, finetune_steps=2, save_every=4, keep_checkpoints=keep), verbose=False)
    saved_steps = [4, 8, 10]  # every 4 steps, and the last
    assert step_folders(out) == sorted(f"step-{s}" for s in saved_steps[-keep:])


@pytest.fixture
def damaged_copy(uninterrupted, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    return out


@pytest.mark.parametrize(
    ("file_name", "damage", "problem"),
    [
        ("model.safetensors", lambda data: data[: len(data) // 2], "truncated"),
        ("training_state.pt", lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "corrupted"),
        ("manifest.json", lambda data: data.replace(b'"format_version": 1', b'"format_version": 99'), "version 99"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(damaged_copy, capsys, file_name, damage, problem):
    path = damaged_copy / "checkpoints" / f"step-{STEPS}" / file_name
    path.write_bytes(damage(path.read_bytes()))
    status, err = run_cli(["train", "--resume", str(damaged_copy)], capsys)
    assert status == 1
    assert str(path) in err and problem in err and "Traceback" not in err


def test_a_checkpoint_of_another_model_changes_nothing(uninterrupted):
    """Every tensor is checked before any is assigned: a failed restore leaves model and optimizer as they were."""
    from nmflow.app.tasks import build_task
    from nmflow.app.train import _optimizer
    from nmflow.core.recipes import Recipe
    from nmflow.core.sparsifier import sparsify

    saved = checkpoint.read_checkpoint(uninterrupted / "checkpoints" / f"step-{STEPS}")
    renamed = dict(saved.model)
    renamed["classifier.weight"] = renamed["classifier.weight"][:5]
    vision = build_task(
        "vision", data=None, data_seed=0, model={}, device=torch.device("cpu"), block_size=128, image_size=None
    )
    model = vision.build_model()
    sp = sparsify(model, Recipe("mdgf-exp", {"ff": "1:16"}, dense_steps=10, finetune_steps=10), STEPS, verbose=False)
    optimizer = _optimizer(model, config(uninterrupted))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="classifier.weight"):
        checkpoint.restore(checkpoint.Checkpoint(saved.path, saved.step, renamed, saved.state), model, optimizer, sp)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert sp.status().step == 0 and optimizer.state_dict()["state"] == {}


def test_tensorboard_holds_the_scalars_of_the_metrics(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(uninterrupted / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    diagnostics = {f"{name}/ff" for name in ("flip_rate", "grad_abs_var", "exp_avg_sq_var", "exp_avg_sq_norm")}
    assert tags == {"train/loss", "train/lr", "train/D", "density/ff", "val/loss", "val/accuracy", *diagnostics}
    lines = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    losses = [(line["step"], line["loss"]) for line in lines if "loss" in line]
    logged = board.Scalars("train/loss")
    assert [e.step for e in logged] == [step for step, _ in losses]
    assert [e.value for e in logged] == pytest.approx([loss for _, loss in losses])  # stored as float32
    density = {e.step: e.value for e in board.Scalars("density/ff")}
    assert (density[1], density[STEPS]) == (1.0, pytest.approx(1 / 16))


def test_asking_for_tensorboard_without_it_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tensorboard" else find_spec(name))
    status, err = run_cli(["train", "--steps", "2", "--tensorboard", "--out", str(tmp_path / "run")], capsys)
    assert status == 2
    assert "pip install tensorboard" in err
    assert not (tmp_path / "run").exists()
