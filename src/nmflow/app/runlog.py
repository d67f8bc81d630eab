"""What a run writes as it trains: ``metrics.jsonl`` lines and TensorBoard scalars, by rank 0 alone.

On every other rank a `RunLog` writes nothing, so the training loop never asks which rank it runs on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from nmflow.core.sparsifier import SparsityStatus

__all__ = ["PER_KEY_STATISTICS", "RunLog"]

PER_KEY_STATISTICS = ("density", "flip_rate", "grad_abs_var", "exp_avg_sq_var", "exp_avg_sq_norm")
"""Statistics a training line holds per recipe key; TensorBoard gets them as ``<statistic>/<key>``."""


class RunLog:
    """The run's ``metrics.jsonl`` and, with ``tensorboard``, its TensorBoard scalars.

    ``purge_step`` (a resumed run) appends to ``metrics.jsonl`` and hides what the stopped run logged to
    TensorBoard after the checkpoint it resumes from. ``metric`` is the task's score besides the loss.
    """

    def __init__(self, out: Path, metric: str, *, writes: bool, tensorboard: bool, purge_step: int | None) -> None:
        self._metric_keys = ("loss", metric)  # what a validation line holds
        resume = purge_step is not None
        self._file = open(out / "metrics.jsonl", "a" if resume else "w") if writes else None  # noqa: SIM115
        self._board = None
        if writes and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

    def training(
        self, step: int, loss: float, lr: float, status: SparsityStatus, flops: int, statistics: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Log the training line of ``step`` (optimizer steps done); returns it."""
        line = {"step": step, "loss": loss, "lr": lr, "phase": str(status.phase), "D": status.decay}
        line |= {"patterns": status.by_key, "density": status.density, "train_flops": flops, **statistics}
        self._write(line)
        self._scalars(step, {"train/loss": loss, "train/lr": lr, "train/D": status.decay})
        self._scalars(
            step, {f"{name}/{key}": v for name in PER_KEY_STATISTICS for key, v in line.get(name, {}).items()}
        )
        return line

    def validation(self, step: int, scores: Mapping[str, float], flops: int, *, finalized: bool = False) -> None:
        """Log a validation line: the loss and the task's metric of ``scores``."""
        marker = {"finalized": True} if finalized else {}
        kept = {k: scores[k] for k in self._metric_keys}
        self._write({"step": step, **marker, **{f"val_{k}": v for k, v in kept.items()}, "train_flops": flops})
        self._scalars(step, {f"val/{k}": v for k, v in kept.items()})

    def flush(self) -> None:
        """Make everything logged so far durable, before a checkpoint records how long the metrics file is."""
        if self._board is not None:
            self._board.flush()

    def bytes_written(self) -> int:
        """The length of ``metrics.jsonl`` now, so a resumed run can cut it back to this point."""
        return self._file.tell() if self._file is not None else 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def _scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        if self._board is None:
            return
        for tag, value in values.items():
            if value is not None:
                self._board.add_scalar(tag, value, step)
