"""Byte-level text splits: CPython's bundled documentation topics, or the user's text files."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nmflow.app.data.splits import check_fractions
from nmflow.core.errors import ConfigError

__all__ = ["TextSplits", "load_text_splits", "random_windows", "text_windows"]

TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclass(frozen=True)
class TextSplits:
    """Train/validation/test text as 1-D uint8 tensors of UTF-8 bytes, for byte-level language modelling."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    source: str

    @property
    def vocab_size(self) -> int:
        return 256


def load_text_splits(
    path: str | Path | None = None,
    data_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    chunk_bytes: int = 2048,
) -> TextSplits:
    """UTF-8 bytes of a text corpus, split by chunks: nearby text lands in one split, so none leaks across.

    ``path`` None reads CPython's bundled documentation topics (``pydoc_data.topics``, no download); a file is
    read as UTF-8 text; a folder gives its ``.txt``, ``.md`` and ``.rst`` files (recursive, sorted), joined with
    blank lines. The bytes are cut into consecutive chunks of ``chunk_bytes``; a shuffle seeded by
    ``data_seed`` picks ``val_fraction`` of them (rounded, at least one) for validation and ``test_fraction``
    for test; the rest is train. Each split keeps its chunks in their original order.
    """
    check_fractions(val_fraction, test_fraction)
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    text, source = _read_text(path)
    data = torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy())
    num_chunks = math.ceil(len(data) / chunk_bytes)
    if num_chunks < 3:
        raise ConfigError(
            f"text of {source} is too short: {len(data)} bytes; train, val and test need at least 3 chunks of "
            f"chunk_bytes={chunk_bytes}, i.e. at least {2 * chunk_bytes + 1} bytes (or pass a smaller chunk_bytes)"
        )
    num_val, num_test = _chunk_counts(num_chunks, val_fraction, test_fraction, source)
    order = torch.randperm(num_chunks, generator=torch.Generator().manual_seed(data_seed))

    def split(chunks: torch.Tensor) -> torch.Tensor:
        return torch.cat([data[c * chunk_bytes : (c + 1) * chunk_bytes] for c in chunks.sort().values.tolist()])

    return TextSplits(
        train=split(order[num_val + num_test :]),
        val=split(order[:num_val]),
        test=split(order[num_val : num_val + num_test]),
        source=source,
    )


def _chunk_counts(num_chunks: int, val_fraction: float, test_fraction: float, source: str) -> tuple[int, int]:
    """How many chunks go to val and to test: each share rounded, at least one, leaving at least one for train."""
    num_val = max(1, round(val_fraction * num_chunks))
    num_test = max(1, round(test_fraction * num_chunks))
    if num_val + num_test >= num_chunks:
        raise ConfigError(
            f"text of {source} makes only {num_chunks} chunks: val_fraction={val_fraction} and "
            f"test_fraction={test_fraction} leave none for training; give more text or a smaller chunk_bytes"
        )
    return num_val, num_test


def _read_text(path: str | Path | None) -> tuple[str, str]:
    """The corpus and a description of where it came from."""
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics)), "Python documentation topics (pydoc_data)"
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"text data {path} does not exist: give a text file or a folder of .txt/.md/.rst files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"text folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    else:
        files = [path]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"text file {file} is not valid UTF-8: {error}") from error
    return "\n\n".join(texts), str(path)


def text_windows(data: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every byte of ``data`` after the first as a target exactly once: windows [K, block_size + 1] (int64).

    Window k is ``data[k * block_size : (k + 1) * block_size + 1]``, so consecutive windows share one byte (the
    last target of one is the first input of the next) and their targets ``w[:, 1:]`` tile the split; the ragged
    tail shorter than a block is dropped.
    """
    _check_window(data, block_size)
    count = (len(data) - 1) // block_size
    return data[: count * block_size + 1].long().unfold(0, block_size + 1, block_size).contiguous()


def random_windows(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A training batch [batch_size, block_size + 1] (int64) of windows at random offsets drawn from ``generator``."""
    _check_window(data, block_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(block_size + 1)
    return data[offsets.to(data.device)].long()


def _check_window(data: torch.Tensor, block_size: int) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size must be positive, got {block_size}")
    if data.ndim != 1:
        raise ConfigError(f"text data must be a 1-D tensor of bytes, got shape {tuple(data.shape)}")
    if len(data) < block_size + 1:
        raise ConfigError(
            f"a text split of {len(data)} bytes is too short for one window of block_size + 1 = {block_size + 1} "
            "bytes: use a smaller block_size or more text"
        )
