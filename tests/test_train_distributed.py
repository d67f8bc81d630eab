"""`nmflow train` under torchrun: 2 CPU processes (gloo, loopback only) match one process on the same global batches.

Every process draws the same global batch and trains on its half; DDP averages the half-batch gradients of a
mean-reduced loss, which is the whole-batch gradient up to rounding. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, rank0_outcome
from safetensors.torch import load_file

from nmflow.app.cli import main
from nmflow.app.config import TrainConfig
from nmflow.app.train import train
from nmflow.core.errors import ConfigError

STEPS = 30
SAVE_EVERY = 15
RUN_FLAGS = ["--steps", str(STEPS), "--batch-size", "16", "--log-every", "1", "--eval-every", "10"]
RUN_FLAGS += ["--save-every", str(SAVE_EVERY), "--seed", "3"]
# Adam normalizes each update, so rounding differences of the averaged gradients (~1e-7) grow over the steps:
# 1e-5 was measured after 30 steps.
WEIGHT_TOLERANCE = {"rtol": 0.0, "atol": 1e-4}


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """The installed ``nmflow`` script under torchrun on this machine only (gloo bound to the loopback device)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1"]
    launcher += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    command = [*launcher, str(Path(sys.executable).with_name("nmflow")), *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """Plain ``nmflow train`` in this process: one process, whole global batches."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *RUN_FLAGS, "--out", str(out)]) == 0
    return out


def test_two_processes_match_one_and_write_one_set_of_files(single, tmp_path):
    out = tmp_path / "run"
    result = torchrun(["train", *RUN_FLAGS, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("test accuracy") == 1  # only rank 0 prints the summary

    expected, got = load_file(single / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    difference = max_weight_difference(got, expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **WEIGHT_TOLERANCE, msg=f"{name}: max {difference}")
        assert torch.equal(got[name] != 0, expected[name] != 0), f"{name}: the finalized masks differ"
    summary, reference = (json.loads((o / "summary.json").read_text()) for o in (out, single))
    assert summary["layers"] == reference["layers"]  # the realized patterns, layer by layer
    assert summary["phases"] == reference["phases"]

    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{SAVE_EVERY}", f"step-{STEPS}"]
    lines, reference_lines = read_metrics(out), read_metrics(single)
    assert [line["step"] for line in lines] == [line["step"] for line in reference_lines]  # each line once
    for line, reference_line in zip(lines, reference_lines, strict=True):
        assert line.keys() == reference_line.keys()
        if "loss" in line:  # the loss of the whole global batch, averaged over the processes
            assert line["loss"] == pytest.approx(reference_line["loss"], rel=1e-4)
            assert line["patterns"] == reference_line["patterns"]


def test_two_processes_resume_a_checkpoint_of_one_process(single, tmp_path):
    """Both processes load rank 0's checkpoint (the world size is not part of the run) and end where one process did."""
    out = tmp_path / "run"
    shutil.copytree(single, out)
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS}")
    result = torchrun(["train", "--resume", str(out)])
    assert result.returncode == 0, result.stderr

    expected, got = load_file(single / "model.safetensors"), load_file(out / "model.safetensors")
    difference = max_weight_difference(got, expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **WEIGHT_TOLERANCE, msg=f"{name}: max {difference}")
    assert [line["step"] for line in read_metrics(out)] == [line["step"] for line in read_metrics(single)]


def test_a_global_batch_the_processes_cannot_share_equally_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"batch_size 15 must be divisible by the number of processes \(2\)"):
        train(TrainConfig(steps=10, batch_size=15, out=str(out)), verbose=False)
    assert not out.exists()


def peer_worker(rank: int, port: int, fate: str, out_dir: str) -> None:
    """A rank of a 2-process launch inside `nmflow train`'s process group; rank 1 dies or never joins."""
    from nmflow.app.ranks import Ranks, process_group

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    if rank == 1 and fate == "absent":
        return
    try:
        with process_group(Ranks(rank, 2, rank), "cpu"):
            for step in range(5):
                if rank == 1 and step == 2:
                    os._exit(0)  # dies between two all-reduces, like a killed process
                torch.distributed.all_reduce(torch.ones(3))
        outcome = "finished"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize(
    ("fate", "message"),
    [
        # gloo words the lost peer differently from run to run ("Read error", "Connection closed by peer")
        ("killed", "PeerError: rank 0 of 2: no answer from another process of the run ("),
        ("absent", "PeerError: rank 0 of 2: the processes of the run did not all join"),
    ],
)
def test_a_train_process_whose_peer_died_fails_with_a_clear_error(fate, message, tmp_path, monkeypatch):
    monkeypatch.setenv("NMFLOW_PROCESS_GROUP_TIMEOUT", "5")  # read by the spawned processes when they import nmflow
    outcome = rank0_outcome(peer_worker, (free_port(), fate, str(tmp_path)), tmp_path)
    assert outcome.startswith(message), outcome
    assert "--resume" in outcome or fate == "absent"
