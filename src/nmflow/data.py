"""The data of `nmflow train`: scikit-learn's bundled 8x8 handwritten digits, split once, no download.

The split depends only on ``data_seed``, so runs with different training seeds see the same
train/validation/test images and differ only in their training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["DigitsSplits", "Split", "batch_indices", "load_digits_splits"]

PIXEL_MAX = 16.0  # load_digits pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap)


@dataclass(frozen=True)
class Split:
    """Images [N, 1, 8, 8] (float32, normalized) and their labels [N] (int64)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class DigitsSplits:
    train: Split
    val: Split
    test: Split


def load_digits_splits(data_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> DigitsSplits:
    """Stratified train/validation/test split of the 1,797 digits, normalized with train statistics only."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX  # [N, 1, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    everything = list(range(len(labels)))
    rest, test = train_test_split(everything, test_size=test_fraction, stratify=digits.target, random_state=data_seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=digits.target[rest], random_state=data_seed
    )
    mean, std = images[train].mean(), images[train].std()

    def split(indices: list[int]) -> Split:
        return Split((images[indices] - mean) / std, labels[indices])

    return DigitsSplits(split(train), split(val), split(test))


def batch_indices(size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``range(size)``: one shuffled pass after another, no example dropped."""
    pending = torch.empty(0, dtype=torch.int64)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(size, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]
