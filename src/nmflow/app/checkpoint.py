"""Checkpoints of `nmflow train`: written atomically, checked in full before anything is restored.

A run's output folder holds ``checkpoints/step-<N>/``, one per save, each with:

* ``model.safetensors``: the model's ``state_dict`` (nmflow's parametrizations leave its keys unchanged);
* ``training_state.pt``: the optimizer, the sparsifier, the RNG states, the data position, the step, the
  length of ``metrics.jsonl`` at the save and the resolved config, all plain data that loads with
  ``torch.load(..., weights_only=True)``;
* ``manifest.json``: the format version, the step and the size and SHA-256 of both files, written last.

A checkpoint is written into a hidden temporary folder beside the others and renamed into place once
complete, so a folder named ``step-<N>`` is always whole; a crash leaves at most a temporary folder,
which is ignored and removed by the next save. Older checkpoints are deleted only after the new one is
in place. Loading checks the manifest, every file's size and checksum, and every tensor's name, shape
and dtype before it assigns anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmflow import __version__
from nmflow.app.config import RESUME_OVERRIDES, TrainConfig
from nmflow.core.errors import CheckpointError, NmflowError
from nmflow.core.sparsifier import Sparsifier

__all__ = [
    "CHECKPOINT_FOLDER",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "TrainingState",
    "latest_checkpoint",
    "read_checkpoint",
    "restore",
    "resume_from_checkpoint",
    "save_checkpoint",
]

FORMAT_VERSION = 1
CHECKPOINT_FOLDER = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"step-(\d+)")
_TEMPORARY_PREFIX = ".tmp-"


@dataclass(frozen=True)
class TrainingState:
    """Everything besides the weights that the step after a checkpoint depends on: ``training_state.pt``."""

    step: int  # optimizer steps done
    optimizer: dict[str, Any]
    sparsifier: dict[str, Any]
    torch_rng: torch.Tensor
    batch_rng: torch.Tensor
    batches_drawn: int  # one batch per step: the data position
    metrics_bytes: int  # the length of metrics.jsonl at the save
    config: dict[str, Any]  # the resolved config, to refuse resuming under another one

    @classmethod
    def now(
        cls,
        step: int,
        optimizer: torch.optim.Optimizer,
        sp: Sparsifier,
        batch_rng: torch.Generator,
        metrics_bytes: int,
        config: dict[str, Any],
    ) -> TrainingState:
        """The state of a run that has done ``step`` steps, drawing one batch per step."""
        return cls(
            step,
            optimizer.state_dict(),
            sp.state_dict(),
            torch.get_rng_state(),
            batch_rng.get_state(),
            step,
            metrics_bytes,
            config,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``torch.save`` (loads with ``weights_only=True``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_STATE_KEYS = {f.name for f in fields(TrainingState)}
_UNCOMPARED = {"nmflow_version", "out", *RESUME_OVERRIDES}  # config keys a resumed run may change


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from disk and checked against its manifest; nothing of it is applied yet."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]


def save_checkpoint(out: Path, model: nn.Module, state: Mapping[str, Any], *, keep: int, write_model=None) -> Path:
    """Write ``checkpoints/step-<state['step']>`` atomically, then delete all but the newest ``keep``.

    ``state`` holds the keys of ``training_state.pt`` (see the module docstring). ``write_model`` is
    ``safetensors.torch.save_file`` unless given (the tests give one that fails midway).
    """
    from safetensors.torch import save_file

    missing = _STATE_KEYS - set(state)
    if missing:
        raise ValueError(f"checkpoint state lacks {sorted(missing)}")
    folder = out / CHECKPOINT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(folder)
    final = folder / f"step-{state['step']}"
    temporary = folder / f"{_TEMPORARY_PREFIX}{final.name}"
    temporary.mkdir()
    try:
        aliases = _aliases(model)  # tied weights (GPT-2's lm_head and wte) are written once
        tensors = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items() if n not in aliases}
        (write_model or save_file)(tensors, str(temporary / MODEL_FILE))
        torch.save(dict(state), temporary / STATE_FILE)
        manifest = {
            "format_version": FORMAT_VERSION,
            "nmflow_version": __version__,
            "step": state["step"],
            "files": {name: _describe_file(temporary / name) for name in (MODEL_FILE, STATE_FILE)},
        }
        _write_synced(temporary / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # one of the same step, left by a run resumed from before it: swapped out whole
            os.replace(final, folder / f"{_TEMPORARY_PREFIX}old-{final.name}")
        os.replace(temporary, final)
        _remove_temporaries(folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in _complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path:
    """The newest ``checkpoints/step-<N>`` of a run; temporary folders of an interrupted save do not count."""
    folders = _complete_checkpoints(out / CHECKPOINT_FOLDER)
    if not folders:
        raise CheckpointError(f"no checkpoint to resume from in {out / CHECKPOINT_FOLDER}")
    return folders[-1]


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check a checkpoint folder: manifest, sizes, checksums and the state's keys. Applies nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint manifest {manifest_path}: {err.strerror}") from None
    except ValueError as err:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"checkpoint manifest {manifest_path} has format version {found!r}; this nmflow ({__version__}) "
            f"reads version {FORMAT_VERSION}"
        )
    expected_files = manifest.get("files")
    if not isinstance(expected_files, dict) or set(expected_files) != {MODEL_FILE, STATE_FILE}:
        raise CheckpointError(f"checkpoint manifest {manifest_path} does not list {MODEL_FILE} and {STATE_FILE}")
    for name, expected in expected_files.items():
        _check_file(path / name, expected)
    try:
        model = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint file {path / MODEL_FILE} cannot be read: {err}") from None
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises several kinds for a damaged or foreign file
        raise CheckpointError(f"checkpoint file {path / STATE_FILE} cannot be read: {err}") from None
    if not isinstance(state, dict) or _STATE_KEYS - set(state):
        lacking = sorted(_STATE_KEYS - set(state)) if isinstance(state, dict) else "everything"
        raise CheckpointError(f"checkpoint file {path / STATE_FILE} lacks {lacking}")
    if state["step"] != manifest.get("step"):
        raise CheckpointError(
            f"checkpoint file {path / STATE_FILE} holds step {state['step']}, its manifest step {manifest.get('step')}"
        )
    return Checkpoint(path, state["step"], model, state)


def restore(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, sp: Sparsifier) -> None:
    """Load a checkpoint's model, optimizer and sparsifier; checks every tensor first, so a mismatch changes nothing.

    The sparsifier goes first: its own ``load_state_dict`` checks everything before it assigns anything.
    """
    model_file = checkpoint.path / MODEL_FILE
    aliases = _aliases(model)
    current = {name: t for name, t in model.state_dict().items() if name not in aliases}
    if set(checkpoint.model) != set(current):
        missing, unexpected = sorted(set(current) - set(checkpoint.model)), sorted(set(checkpoint.model) - set(current))
        raise CheckpointError(f"checkpoint file {model_file} does not fit the model: lacks {missing}, has {unexpected}")
    for name, tensor in checkpoint.model.items():
        if tensor.shape != current[name].shape or tensor.dtype != current[name].dtype:
            raise CheckpointError(
                f"checkpoint file {model_file}: {name} is {tuple(tensor.shape)}/{tensor.dtype}, "
                f"the model has {tuple(current[name].shape)}/{current[name].dtype}"
            )
    _check_optimizer_state(checkpoint.state["optimizer"], optimizer, checkpoint.path / STATE_FILE)
    try:
        sp.load_state_dict(checkpoint.state["sparsifier"])
    except NmflowError as err:
        raise CheckpointError(f"checkpoint file {checkpoint.path / STATE_FILE}: {err}") from None
    model.load_state_dict(checkpoint.model, strict=False)  # every name but the aliases, checked above
    optimizer.load_state_dict(checkpoint.state["optimizer"])


def resume_from_checkpoint(
    out: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sp: Sparsifier,
    batches: Iterator[Any],
    batch_rng: torch.Generator,
    *,
    cut_metrics: bool,
) -> int:
    """Load the newest checkpoint of ``out`` after checking all of it; returns the step to continue from.

    The batch order is replayed from the seed to the saved data position, then checked against the saved
    generator state. With ``cut_metrics`` (rank 0), ``metrics.jsonl`` is cut back to its length at the checkpoint.
    Every process loads the same checkpoint.
    """
    checkpoint = read_checkpoint(latest_checkpoint(out))
    state_file = checkpoint.path / STATE_FILE
    saved, current = dict(checkpoint.state["config"]), config.resolved(out)
    changed = sorted(k for k in set(saved) | set(current) if k not in _UNCOMPARED and saved.get(k) != current.get(k))
    if changed:
        raise CheckpointError(
            f"{out / 'config.yaml'} differs from the config its checkpoint {state_file} was saved with: "
            f"{', '.join(changed)}"
        )
    metrics_path, metrics_bytes = out / "metrics.jsonl", checkpoint.state["metrics_bytes"]
    if not metrics_path.is_file() or metrics_path.stat().st_size < metrics_bytes:
        raise CheckpointError(
            f"{metrics_path} is shorter than the {metrics_bytes} bytes it had at step {checkpoint.step}"
        )
    for _ in range(checkpoint.state["batches_drawn"]):
        next(batches)
    if not torch.equal(batch_rng.get_state(), checkpoint.state["batch_rng"]):
        raise CheckpointError(f"checkpoint file {state_file}: the batch order replayed from the seed differs")
    restore(checkpoint, model, optimizer, sp)
    torch.set_rng_state(checkpoint.state["torch_rng"])
    if cut_metrics:
        os.truncate(metrics_path, metrics_bytes)
    return checkpoint.step


# ----------------------------------------------------------------------------- helpers
def _aliases(model: nn.Module) -> set[str]:
    """State-dict names whose tensor is the same as that of an earlier name (tied weights)."""
    seen, aliases = set(), set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen and tensor.numel():
            aliases.add(name)
        seen.add(key)
    return aliases


def _complete_checkpoints(folder: Path) -> list[Path]:
    """``step-<N>`` folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _remove_temporaries(folder: Path) -> None:
    for leftover in folder.glob(f"{_TEMPORARY_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _describe_file(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        os.fsync(file.fileno())  # on disk before the manifest that vouches for it
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_file(path: Path, expected: Any) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    if not isinstance(expected, dict) or not {"bytes", "sha256"} <= set(expected):
        raise CheckpointError(f"checkpoint manifest {path.parent / MANIFEST_FILE} has no size and checksum of {path}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        state = "truncated" if size < expected["bytes"] else "longer than written"
        raise CheckpointError(f"checkpoint file {path} is {state}: {size} bytes, the manifest says {expected['bytes']}")
    if _sha256(path) != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupted: its SHA-256 differs from the manifest's")


def _check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """What ``Optimizer.load_state_dict`` would find wrong only after assigning, or not at all (shapes)."""
    groups = optimizer.param_groups
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise CheckpointError(f"checkpoint file {path}: the optimizer state lacks 'state' or 'param_groups'")
    saved_sizes = [len(g.get("params", ())) for g in state["param_groups"]]
    if saved_sizes != [len(g["params"]) for g in groups]:
        raise CheckpointError(
            f"checkpoint file {path}: optimizer parameter groups of sizes {saved_sizes}, "
            f"this run has {[len(g['params']) for g in groups]}"
        )
    params = [p for g in groups for p in g["params"]]
    for index, entry in state["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise CheckpointError(f"checkpoint file {path}: optimizer state for unknown parameter {index!r}")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise CheckpointError(
                    f"checkpoint file {path}: optimizer {key} of parameter {index} is {tuple(value.shape)}, "
                    f"the parameter {tuple(params[index].shape)}"
                )
