"""Schedules as pure functions of the optimizer step, so a resumed run needs nothing but the step.

A run of ``total_steps`` T is split into three phases (paper §3):

* ``dense``    for steps ``0 <= t < d``: plain training, no mask;
* ``sparse``   for ``d <= t < T - s``: the recipe's mask decay (MDGF) or pattern walk (SDGF);
* ``finetune`` for ``t >= T - s``: binary mask at the target pattern. Past T the run stays here.

`RunSchedule` is one recipe over one run: the sparsifier, the FLOPs count and the diagnostics all read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from nmflow.core.errors import ConfigError
from nmflow.core.masks import NMPattern

__all__ = [
    "DecaySchedule",
    "Phase",
    "PhasePlan",
    "RunSchedule",
    "exponential_decay",
    "geometric_patterns",
    "linear_decay",
    "stepwise_patterns",
]

DecaySchedule = Callable[[int], float]
"""D(j): the factor applied to pruned weights, j optimizer steps after the dense phase ends."""


class Phase(str, Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    FINETUNE = "finetune"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PhasePlan:
    """Step boundaries of the three phases."""

    total_steps: int
    dense_steps: int
    finetune_steps: int

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.dense_steps < 0 or self.finetune_steps < 0:
            raise ConfigError(
                f"dense_steps and finetune_steps must be >= 0, got {self.dense_steps} and {self.finetune_steps}"
            )
        if self.dense_steps + self.finetune_steps > self.total_steps:
            raise ConfigError(
                f"dense_steps ({self.dense_steps}) + finetune_steps ({self.finetune_steps}) "
                f"exceed total_steps ({self.total_steps})"
            )

    @property
    def sparse_start(self) -> int:
        return self.dense_steps

    @property
    def finetune_start(self) -> int:
        return self.total_steps - self.finetune_steps

    def phase(self, step: int) -> Phase:
        if step >= self.finetune_start:
            return Phase.FINETUNE
        if step < self.sparse_start:
            return Phase.DENSE
        return Phase.SPARSE

    def interval(self, step: int, count: int) -> int:
        """Which of ``count`` equal intervals of the sparse window holds ``step`` (clamped to the window)."""
        window = self.finetune_start - self.sparse_start
        if window <= 0:
            return count - 1
        offset = min(max(step - self.sparse_start, 0), window - 1)
        return offset * count // window


@dataclass(frozen=True)
class RunSchedule:
    """A recipe over a run of ``plan.total_steps`` steps: phase, D and pattern, each a pure function of the step.

    Built by `Recipe.schedule`. ``masked`` is False for the dense reference run; ``decay`` is MDGF's D(j) (None for
    binary masks), ``beta`` its rate.
    """

    plan: PhasePlan
    masked: bool
    decay: DecaySchedule | None = None
    beta: float | None = None

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    def phase(self, step: int) -> Phase:
        """The phase of the forward pass at ``step`` (always dense for the reference run)."""
        return self.plan.phase(step) if self.masked else Phase.DENSE

    def decay_at(self, step: int) -> float | None:
        """D at ``step``; None when the masks are binary or absent."""
        if self.decay is None or self.phase(step) is not Phase.SPARSE:
            return None
        return self.decay(step - self.plan.sparse_start)

    def soft(self, step: int) -> bool:
        """Whether pruned weights still take part in the forward pass, scaled by D > 0."""
        decay = self.decay_at(step)
        return decay is not None and decay > 0

    def pattern_at(self, sequence: Sequence[NMPattern], step: int) -> NMPattern | None:
        """Where a pattern walk ending at ``sequence[-1]`` stands at ``step`` (None: dense)."""
        phase = self.phase(step)
        if phase is Phase.DENSE:
            return None
        if phase is Phase.FINETUNE:
            return sequence[-1]
        return sequence[self.plan.interval(step, len(sequence))]

    def change_points(self, walk_lengths: Iterable[int]) -> list[int]:
        """The steps at which a pattern, or whether masks are soft, may change; sorted, from 0.

        ``walk_lengths``: the length of every pattern walk the run follows.
        """
        plan = self.plan
        points = {0, plan.sparse_start, plan.finetune_start}
        window = plan.finetune_start - plan.sparse_start
        for count in set(walk_lengths):
            points.update(plan.sparse_start + -(-i * window // count) for i in range(count))
        lo, hi = plan.sparse_start, plan.finetune_start  # D only falls: the first step of binary masks
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.soft(mid) else (lo, mid)
        points.add(lo)
        return sorted(p for p in points if p < plan.total_steps)


def linear_decay(beta: float) -> DecaySchedule:
    r"""MDGF-Linear: :math:`D(j) = \max(1 - \beta j, 0)`."""
    return lambda j: max(1.0 - beta * j, 0.0)


def exponential_decay(beta: float) -> DecaySchedule:
    r"""MDGF-Exponential: :math:`D(j) = e^{-\beta j}`."""
    return lambda j: math.exp(-beta * j)


def stepwise_patterns(target: NMPattern) -> list[NMPattern]:
    """SDGF-Stepwise: (M-1):M, M/2:M, M/4:M, ..., N:M (paper §3.2; 1:8 gives 7:8, 4:8, 2:8, 1:8).

    Needs M/N to be a power of two, so that halving reaches N exactly.
    """
    n, m = target.n, target.m
    ratio = m // n
    if n == m or m % n or ratio & (ratio - 1):
        raise ConfigError(
            f"SDGF-stepwise cannot walk to {target}: the sequence (M-1):M, M/2:M, ... reaches N:M only when "
            f"N < M and M/N is a power of two"
        )
    sequence = [NMPattern(m - 1, m)]
    kept = m // 2
    while kept >= n:
        if NMPattern(kept, m) != sequence[-1]:
            sequence.append(NMPattern(kept, m))
        kept //= 2
    return sequence


def geometric_patterns(target: NMPattern, k: int, group_size: int) -> list[NMPattern]:
    """SDGF-Geometric: kN:kM, (k/2)N:(k/2)M, ..., N:M, at constant density (paper §3.2, k = 16).

    The block kM may not exceed what the layer's input dimension ``group_size`` can hold: the
    multiplier is capped per step at the largest power of two whose block divides ``group_size``.
    Every layer keeps log2(k) + 1 intervals, so all layers reach the target at the same step; a
    capped layer simply stays on its largest feasible block for the first intervals.
    """
    if k < 1 or k & (k - 1):
        raise ConfigError(f"geometric_k must be a power of two >= 1, got {k}")
    cap = 1
    while cap * 2 <= k and group_size % (cap * 2 * target.m) == 0:
        cap *= 2
    sequence = []
    factor = k
    while factor >= 1:
        used = min(factor, cap)
        sequence.append(NMPattern(target.n * used, target.m * used))
        factor //= 2
    return sequence
