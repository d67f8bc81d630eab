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

from nmflow.core.errors import ConfigError, NonFiniteWeightError, is_whole_number

__all__ = ["NMPattern", "is_nm", "nm_mask", "realized_n"]

# Where each selection method is fastest (measured on CPU; see docs/benchmarks.md).
_MAX_PAIRWISE_GROUP = 8
_MAX_ITERATIVE_PICKS = 4
_MIN_THRESHOLD_GROUP = 64
_SAME_ORDER_INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass(frozen=True, order=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for field in ("n", "m"):
            value = getattr(self, field)
            if not is_whole_number(value, minimum=None):
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
        hint = " (YAML 1.1 reads an unquoted 1:16 as the number 76: quote it)" if isinstance(value, int) else ""
        raise ConfigError(f"malformed N:M pattern {value!r}: expected 'N:M' with whole numbers, e.g. '1:16'{hint}")

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
        if not torch.isfinite(weight.sum()) and not torch.isfinite(weight).all():  # the sum alone is cheaper
            raise NonFiniteWeightError(f"nm_mask: the weight of shape {tuple(weight.shape)} holds NaN or inf")
        return compute_mask(weight, pattern, dim)


def compute_mask(weight: torch.Tensor, pattern: NMPattern, dim: int) -> torch.Tensor:
    """`nm_mask` without validation or host synchronisation: the per-forward hot path."""
    weight = weight.detach()
    if pattern.is_dense:
        return torch.ones_like(weight, dtype=torch.bool)
    magnitude = weight.abs()
    if magnitude.dtype in _SAME_ORDER_INTS:  # non-negative floats order as their bits: integer compares are cheaper
        magnitude = magnitude.view(_SAME_ORDER_INTS[magnitude.dtype])
    moved = magnitude.movedim(dim, -1)
    if dim % weight.dim() != weight.dim() - 1:
        moved = moved.contiguous()  # reductions over a middle dimension are several times slower
    groups = moved.view(*moved.shape[:-1], moved.shape[-1] // pattern.m, pattern.m)
    mask = _select_top_n(groups, pattern.n)
    return mask.view(moved.shape).movedim(-1, dim)


def _select_top_n(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Top-n of the last dimension, lower index first among equals.

    Every branch gives the same mask; each is the fastest measured on CPU for its case (docs/benchmarks.md).
    argmax/min are documented to return the first extreme index, and the sort is stable.
    """
    m = groups.shape[-1]
    if n == 1:
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.argmax(-1, keepdim=True), True)
    if m <= _MAX_PAIRWISE_GROUP:
        return _select_by_rank(groups, n)
    if n == m - 1:  # drop the smallest; flipped, so that the highest index goes first among equals
        dropped = groups.flip(-1).min(-1, keepdim=True).indices
        return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, m - 1 - dropped, False)
    if n <= _MAX_ITERATIVE_PICKS and 8 * n <= m:  # a few argmax passes
        kept = torch.zeros_like(groups, dtype=torch.bool)
        for _ in range(n):
            kept.scatter_(-1, groups.masked_fill(kept, -1).argmax(-1, keepdim=True), True)
        return kept
    if m >= _MIN_THRESHOLD_GROUP:
        return _select_by_threshold(groups, n)
    order = groups.sort(dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)


def _select_by_rank(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Small groups: rank each weight by how many others beat it (ties go to the lower index); keep rank < n."""
    columns = groups.unbind(-1)
    rank = torch.zeros_like(groups, dtype=torch.uint8)
    ranks = rank.unbind(-1)  # views into `rank`
    for i in range(len(columns)):
        for j in range(i + 1, len(columns)):
            i_wins = columns[i] >= columns[j]
            ranks[j].add_(i_wins)
            ranks[i].add_(~i_wins)
    return rank < n


def _select_by_threshold(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Large groups: keep what beats the n-th largest value, then fill up with its ties in index order."""
    threshold = groups.topk(n, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = groups > threshold
    ties = groups == threshold
    room = n - above.sum(-1, keepdim=True)
    return above | (ties & (ties.cumsum(-1) <= room))


def realized_n(weight: torch.Tensor, m: int, dim: int = 1) -> int:
    """The largest number of non-zeros in any group of ``m`` along ``dim``: the N the weight really has."""
    nonzero = (weight.detach() != 0).movedim(dim, -1)
    groups = nonzero.reshape(*nonzero.shape[:-1], nonzero.shape[-1] // m, m)
    return int(groups.sum(-1).max()) if groups.numel() else 0


def is_nm(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> bool:
    """True when no group of ``m`` along ``dim`` holds more than ``n`` non-zeros."""
    return weight.shape[dim] % m == 0 and realized_n(weight, m, dim) <= n
