"""What the image and text loaders share: checked split fractions and endless shuffled batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nmflow.core.errors import ConfigError

__all__ = ["batch_indices", "check_fractions"]


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Both fractions within (0, 1), leaving training data."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"{name} must be between 0 and 1 (exclusive), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction + test_fraction must be below 1 to leave training data, got {val_fraction} + {test_fraction}"
        )


def batch_indices(size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``range(size)``: one shuffled pass after another, no example dropped."""
    pending = torch.empty(0, dtype=torch.int64)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(size, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]
