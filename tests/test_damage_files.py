"""Damage to the other files nmflow reads: run checkpoints, sparsifier states, config files, sweep specs.

Bits are flipped one at a time (every bit of the small files, a seeded sample of the larger ones). A damaged
checkpoint or sparsifier state is refused with a message naming it, or reads as the same data: never as
other weights. Config files and sweep specs are text people write, with no checksum: a flip that spells
another valid value is read as that value, as an edit would be; every other flip is refused with a
`ConfigError` that names the file or the key, never a traceback. A run's own ``config.yaml`` is guarded on
``--resume`` by the config stored in its checkpoint.
"""

from __future__ import annotations

import io
import random
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import TimmStyleViT, run_cli

import nmflow
from nmflow.app import checkpoint
from nmflow.app.config import TrainConfig, read_config_file
from nmflow.app.sweep import plan_sweep, read_spec
from nmflow.app.train import train

RUN_STEPS = 4
CONFIG_TEXT = 'method: srste\nsparsity: {ff: "1:16", qk: "1:8"}\nsteps: 40\nbatch_size: 16\nlr: 0.001\n'
SPEC_TEXT = (
    'seeds: [0]\nmethods: [dense, srste]\npatterns: ["1:16"]\nconfig: {log_every: 20}\ntasks:\n  vision: {steps: 10}\n'
)


def flip(data: bytes, bit: int) -> bytes:
    damaged = bytearray(data)
    damaged[bit // 8] ^= 1 << (bit % 8)
    return bytes(damaged)


def sampled_bits(data: bytes, count: int, seed: int = 0) -> list[int]:
    """Every bit of a small file, a seeded sample of a larger one."""
    bits = range(len(data) * 8)
    return list(bits) if len(bits) <= count else random.Random(seed).sample(bits, count)


def same(a, b) -> bool:
    """Deep equality of plain data and tensors (bitwise, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------ sparsifier states
def oneshot_sparsifier() -> nmflow.Sparsifier:
    torch.manual_seed(0)
    recipe = nmflow.Recipe("oneshot", {"ff": "1:4"}, dense_steps=1, finetune_steps=1)
    return nmflow.sparsify(TimmStyleViT(depth=1), recipe, 6, verbose=False)


@pytest.fixture(scope="module")
def sparsifier_state() -> dict:
    sp = oneshot_sparsifier()
    for _ in range(3):  # past the dense step: the one-shot masks are frozen and part of the state
        sp.step()
    state = sp.state_dict()
    assert state["fixed_masks"]
    return state


def test_a_damaged_sparsifier_state_file_is_refused_or_loads_the_same_state(sparsifier_state):
    buffer = io.BytesIO()
    torch.save(sparsifier_state, buffer)
    outcomes = Counter()
    for bit in sampled_bits(buffer.getvalue(), 300):
        try:
            state = torch.load(io.BytesIO(flip(buffer.getvalue(), bit)), weights_only=True)
        except Exception:  # torch.load's own error, raised in the caller's code before nmflow sees anything
            outcomes["refused by torch.load"] += 1
            continue
        sp = oneshot_sparsifier()
        try:
            sp.load_state_dict(state)
        except nmflow.ConfigError as err:
            assert "sparsifier state" in str(err)
            outcomes["refused by nmflow"] += 1
            continue
        outcomes["same" if same(sp.state_dict(), sparsifier_state) else "DIFFERENT"] += 1
    assert "DIFFERENT" not in outcomes, outcomes
    assert outcomes["refused by nmflow"] > 0  # damage torch.load cannot see (tensor bytes) is caught by nmflow


@pytest.mark.parametrize("edit", ["step", "mask", "total_steps"])
def test_a_state_changed_after_state_dict_is_refused_as_damaged(sparsifier_state, edit):
    state = {**sparsifier_state, "fixed_masks": {k: m.clone() for k, m in sparsifier_state["fixed_masks"].items()}}
    if edit == "mask":
        mask = next(iter(state["fixed_masks"].values()))
        mask.view(-1)[7] = ~mask.view(-1)[7]
    else:
        state[edit] = state[edit] - 1
    with pytest.raises(nmflow.ConfigError, match="sparsifier state is damaged"):
        oneshot_sparsifier().load_state_dict(state)


# ------------------------------------------------------------------ run checkpoints of `nmflow train`
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damage") / "run"
    config = TrainConfig(steps=RUN_STEPS, dense_steps=1, finetune_steps=1, save_every=2, log_every=1, eval_every=2)
    train(replace(config, batch_size=8, out=str(out), tensorboard=False), verbose=False)
    return out


@pytest.mark.parametrize("file_name", [checkpoint.MODEL_FILE, checkpoint.STATE_FILE, checkpoint.MANIFEST_FILE])
def test_each_file_of_a_run_checkpoint_damaged_is_refused_or_reads_the_same(run, tmp_path, file_name):
    folder = tmp_path / f"step-{RUN_STEPS}"
    shutil.copytree(run / "checkpoints" / folder.name, folder)
    original = checkpoint.read_checkpoint(folder)
    path = folder / file_name
    data = path.read_bytes()
    outcomes = Counter()
    for bit in sampled_bits(data, 600 if file_name == checkpoint.MANIFEST_FILE else 64):
        path.write_bytes(flip(data, bit))
        try:
            loaded = checkpoint.read_checkpoint(folder)
        except checkpoint.CheckpointError as err:
            assert str(folder) in str(err)
            outcomes["refused"] += 1
            continue
        unchanged = loaded.step == original.step and same(
            [loaded.model, loaded.state], [original.model, original.state]
        )
        outcomes["same" if unchanged else "DIFFERENT"] += 1
    assert "DIFFERENT" not in outcomes, outcomes


@pytest.mark.parametrize("file_name", [checkpoint.MODEL_FILE, checkpoint.STATE_FILE, checkpoint.MANIFEST_FILE])
@pytest.mark.parametrize("damage", ["truncated", "emptied", "removed"])
def test_a_truncated_emptied_or_removed_checkpoint_file_is_refused_naming_it(run, tmp_path, file_name, damage):
    folder = tmp_path / f"step-{RUN_STEPS}"
    shutil.copytree(run / "checkpoints" / folder.name, folder)
    path = folder / file_name
    if damage == "removed":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 if damage == "truncated" else 0])
    named = path if file_name != checkpoint.MANIFEST_FILE else folder / checkpoint.MANIFEST_FILE
    with pytest.raises(checkpoint.CheckpointError, match=str(named).replace(".", r"\.")):
        checkpoint.read_checkpoint(folder)


def test_a_run_config_yaml_damaged_into_another_value_is_refused_on_resume(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    config = out / "config.yaml"
    text = config.read_bytes()
    assert b"lr: 0.001\n" in text
    config.write_bytes(text.replace(b"lr: 0.001\n", flip(b"lr: 0.001\n", 8 * 8 + 1)))  # one bit: 0.001 -> 0.003
    status, err = run_cli(["train", "--resume", str(out)], capsys)
    assert status == 1 and f"{config} differs from the config its checkpoint" in err and err.rstrip().endswith("lr")
    assert "Traceback" not in err


def test_a_run_config_yaml_with_a_bad_value_is_refused_on_resume_naming_it(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.001\n", "lr: fast\n"))
    status, err = run_cli(["train", "--resume", str(out)], capsys)
    assert status == 2 and err.startswith(f"nmflow: error: config file {config}: ") and "lr" in err, err


# ------------------------------------------------------------------ config files and sweep specs
def text_flips(text: str, count: int) -> list[bytes]:
    """Damaged copies of ``text`` that are still UTF-8 (the others: see the test below)."""
    damaged = (flip(text.encode(), bit) for bit in sampled_bits(text.encode(), count))
    return [d for d in damaged if _is_utf8(d)]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def names_the_culprit(message: str, path: Path, text: str) -> bool:
    """The message names the file, or quotes a key or value of the damaged text (as written, or as YAML reads it)."""
    try:
        words = set(map(str, _flatten(read_config_file(path))))
    except nmflow.ConfigError:
        words = set()
    words |= {line.split(":")[0].strip() for line in text.splitlines()}
    quoted = re.findall(r"'([^']+)'", message)
    return str(path) in message or any(q in text for q in quoted) or any(len(w) > 1 and w in message for w in words)


def _flatten(data) -> list:
    if isinstance(data, dict):
        return [item for key, value in data.items() for item in (key, *_flatten(value))]
    return [item for value in data for item in _flatten(value)] if isinstance(data, list) else [data]


def test_a_damaged_config_file_is_read_as_written_or_refused_naming_file_or_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_TEXT)
    original = TrainConfig.from_dict(read_config_file(path))
    outcomes, unclear = Counter(), []
    for damaged in text_flips(CONFIG_TEXT, 10_000):
        path.write_bytes(damaged)
        try:
            config = TrainConfig.from_dict(read_config_file(path))
        except nmflow.ConfigError as err:
            outcomes["refused"] += 1
            if not names_the_culprit(str(err), path, damaged.decode()):
                unclear.append((damaged, str(err)))
            continue
        outcomes["same" if config == original else "another valid config"] += 1
    assert outcomes["refused"] > 0 and not unclear, unclear[:5]


def test_a_damaged_sweep_spec_is_planned_as_written_or_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SPEC_TEXT)
    original = plan_sweep(read_spec(path))
    outcomes = Counter()
    for damaged in text_flips(SPEC_TEXT, 60):  # planning builds a model per task: a sample
        path.write_bytes(damaged)
        try:
            runs = plan_sweep(read_spec(path))
        except nmflow.ConfigError as err:
            assert str(path) in str(err) or "the sweep spec is not valid" in str(err), (damaged, str(err))
            outcomes["refused"] += 1
            continue
        outcomes["same" if runs == original else "another valid spec"] += 1
    assert outcomes["refused"] > 0, outcomes


@pytest.mark.parametrize("reader", [read_config_file, read_spec], ids=["config", "spec"])
def test_a_config_file_damaged_into_invalid_utf8_is_refused_naming_it(tmp_path, reader):
    path = tmp_path / "config.yaml"
    path.write_bytes(flip(CONFIG_TEXT.encode(), 7))  # "m" -> 0xed, which starts no valid UTF-8 sequence here
    with pytest.raises(nmflow.ConfigError, match=str(path)):
        reader(path)
