"""N:M masks: in every group of M consecutive weights along the input dimension, keep the N largest.

Conventions used throughout nmflow:

* ``n`` counts **kept** weights, as in the paper and SR-STE: 1:16 keeps one weight in sixteen
  (some tools count pruned weights instead).
* Groups run along the layer's *input* dimension (``dim``) and never straddle rows: the size of
  ``dim`` must be a multiple of ``m``.
* Ties are broken by position: among equal magnitudes the lower index is kept, so every group
  keeps exactly ``n`` weights, also when all of them are equal or zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nmflow.errors import ConfigError, NonFiniteWeightError

__all__ = ["NMPattern", "is_nm", "nm_mask", "realized_n"]

# Up to this many argmax/argmin passes, iterative selection beats one stable sort (measured on CPU).
_MAX_SELECTION_PASSES = 3


@dataclass(frozen=True, order=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for field in ("n", "m"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"N:M pattern needs whole numbers, got {field}={value!r}")
        if self.n < 1:
            raise ConfigError(f"N:M pattern {self.n}:{self.m} keeps no weight: N must be >= 1 (N counts kept weights)")
        if self.n > self.m:
            raise ConfigError(f"N:M pattern {self.n}:{self.m} keeps more than M weights: N must be <= M")

    @classmethod
    def parse(cls, value: str | tuple[int, int] | NMPattern) -> NMPattern:
        """Read ``"1:16"``, ``(1, 16)`` or an ``NMPattern``."""
        if isinstance(value, NMPattern):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if match:
                return cls(int(match.group(1)), int(match.group(2)))
        raise ConfigError(f"malformed N:M pattern {value!r}: expected 'N:M' with whole numbers, e.g. '1:16'")

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def is_dense(self) -> bool:
        return self.n == self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def nm_mask(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude weights of every ``m`` along ``dim``.

    ``dim`` is the input dimension: 1 for ``nn.Linear`` ([out, in]) and ``nn.Conv2d``
    ([out, in, kh, kw]), 0 for Hugging Face ``Conv1D`` ([in, out], GPT-2).

    >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]), 2, 4).tolist()
    [[False, True, True, False]]
    """
    pattern = NMPattern.parse((n, m))
    if not torch.is_floating_point(weight):
        raise ConfigError(f"nm_mask needs a floating-point weight, got dtype {weight.dtype}")
    if weight.dim() == 0 or not -weight.dim() <= dim < weight.dim():
        raise ConfigError(f"nm_mask: dim={dim} is not a dimension of a weight of shape {tuple(weight.shape)}")
    if weight.shape[dim] % m:
        raise ConfigError(
            f"nm_mask: M={m} does not divide the size {weight.shape[dim]} of dim {dim} "
            f"(weight shape {tuple(weight.shape)}); groups may not straddle rows"
        )
    with torch.no_grad():
        if not torch.isfinite(weight).all():
            raise NonFiniteWeightError(f"nm_mask: the weight of shape {tuple(weight.shape)} holds NaN or inf")
        return compute_mask(weight, pattern, dim)


def compute_mask(weight: torch.Tensor, pattern: NMPattern, dim: int) -> torch.Tensor:
    """`nm_mask` without validation or host synchronisation: the per-forward hot path."""
    weight = weight.detach()
    if pattern.is_dense:
        return torch.ones_like(weight, dtype=torch.bool)
    magnitude = weight.abs()
    moved = magnitude.movedim(dim, -1)
    if dim % weight.dim() != weight.dim() - 1:
        moved = moved.contiguous()  # reductions over a middle dimension are several times slower
    groups = moved.view(*moved.shape[:-1], moved.shape[-1] // pattern.m, pattern.m)
    mask = _select_top_n(groups, pattern.n)
    return mask.view(moved.shape).movedim(-1, dim)


def _select_top_n(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Top-n of the last dimension, lowest index first among equals (argmax/argmin are documented so)."""
    m = groups.shape[-1]
    if min(n, m - n) > _MAX_SELECTION_PASSES:
        order = groups.sort(dim=-1, descending=True, stable=True).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    if n <= m - n:  # pick the n largest, one pass each
        kept = torch.zeros_like(groups, dtype=torch.bool)
        for _ in range(n):
            candidates = groups.masked_fill(kept, -1.0) if n > 1 else groups
            kept.scatter_(-1, candidates.argmax(-1, keepdim=True), True)
        return kept
    # drop the m - n smallest, one pass each; flipped so the *highest* index goes first among equals
    flipped = groups.flip(-1)
    dropped = torch.zeros_like(flipped, dtype=torch.bool)
    for _ in range(m - n):
        dropped.scatter_(-1, flipped.masked_fill(dropped, float("inf")).argmin(-1, keepdim=True), True)
    return ~dropped.flip(-1)


def realized_n(weight: torch.Tensor, m: int, dim: int = 1) -> int:
    """The largest number of non-zeros in any group of ``m`` along ``dim``: the N the weight really has."""
    nonzero = (weight.detach() != 0).movedim(dim, -1)
    groups = nonzero.reshape(*nonzero.shape[:-1], nonzero.shape[-1] // m, m)
    return int(groups.sum(-1).max()) if groups.numel() else 0


def is_nm(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> bool:
    """True when no group of ``m`` along ``dim`` holds more than ``n`` non-zeros."""
    return weight.shape[dim] % m == 0 and realized_n(weight, m, dim) <= n
