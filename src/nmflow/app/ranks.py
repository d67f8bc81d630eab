"""`nmflow train` under torchrun: this process's rank, its process group, and the few collectives the run needs.

A plain run is rank 0 of 1 and never touches `torch.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nmflow.core.errors import ConfigError, NmflowError

__all__ = [
    "PROCESS_GROUP_TIMEOUT",
    "PeerError",
    "Ranks",
    "distributed",
    "global_mean",
    "launched_ranks",
    "process_group",
    "shared_choice",
]

PROCESS_GROUP_TIMEOUT = timedelta(seconds=float(os.environ.get("NMFLOW_PROCESS_GROUP_TIMEOUT", 600)))
"""How long a collective waits for the other processes before the run fails instead of hanging (a peer that
died or stalled); ``NMFLOW_PROCESS_GROUP_TIMEOUT`` (seconds) changes it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch; a plain run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This process's contiguous, equal share of a global batch."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"batch_size {batch_size} must be divisible by the number of processes ({self.world_size}): "
                "every process trains on an equal share of the global batch"
            )
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def launched_ranks() -> Ranks:
    """Read from the variables torchrun sets; a single process without them."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return Ranks()
        return Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"WORLD_SIZE is set but the launch environment is incomplete or invalid: {err}") from None


@contextmanager
def process_group(ranks: Ranks, device_name: str) -> Iterator[torch.device]:
    """The torch device of this process, inside a process group when there are several; destroyed on the way out.

    With CUDA each process takes GPU ``LOCAL_RANK``. A process group the caller initialized is used and left alone.
    """
    device = torch.device(device_name)
    if ranks.world_size == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    where = f"rank {ranks.rank} of {ranks.world_size}"
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        cuda = device if device.type == "cuda" else None
        try:
            dist.init_process_group(backend, device_id=cuda, timeout=PROCESS_GROUP_TIMEOUT)
        except dist.DistError as err:
            raise PeerError(
                f"{where}: the processes of the run did not all join ({_first_line(err)}); check --nproc_per_node, "
                "--nnodes, MASTER_ADDR and MASTER_PORT"
            ) from err
    try:
        yield device
    except RuntimeError as err:
        if not _from_collective(err):
            raise
        raise PeerError(
            f"{where}: no answer from another process of the run ({_first_line(err)}): it died or stalled (see its "
            f"output) or {PROCESS_GROUP_TIMEOUT.total_seconds():.0f} s passed; continue from the newest checkpoint "
            "with nmflow train --resume OUT"
        ) from err
    finally:
        if owned:
            dist.destroy_process_group()


class PeerError(NmflowError, RuntimeError):
    """Another process of a torchrun launch died, stalled or never joined."""


def _from_collective(err: RuntimeError) -> bool:
    """Whether ``err`` is a failed collective: gloo and NCCL raise plain RuntimeErrors that name themselves."""
    text = str(err)
    return isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].split("] ", 1)[-1] if lines else type(err).__name__  # gloo prefixes its source file


def shared_choice(ranks: Ranks, choose: Callable[[], Path]) -> Path:
    """Rank 0 calls ``choose`` (which may raise `ConfigError`); every process gets its answer, or its error."""
    if ranks.world_size == 1:
        return choose()
    chosen: list[str | None] = [None, None]  # the path, or the error message
    if ranks.is_main:
        try:
            chosen[0] = str(choose())
        except ConfigError as err:
            chosen[1] = str(err)
    dist.broadcast_object_list(chosen, src=0)
    if chosen[1] is not None:
        raise ConfigError(chosen[1])
    return Path(chosen[0])


def distributed(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """DDP over the sparsified model (nmflow adds no parameter and every parameter gets a gradient), or the model
    itself in a plain run."""
    if ranks.world_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def global_mean(value: torch.Tensor, ranks: Ranks) -> float:
    """The mean of a per-process mean over all processes: the loss of the whole global batch."""
    if ranks.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= ranks.world_size
    return value.item()
