"""`Recipe`: what to sparsify, to which N:M pattern, and by which training method.

Methods (paper §2-3). Every method trains the dense weight W and runs the forward pass with
``W_eff = W * (mask + D * (1 - mask))``; the gradient reaches W straight through (identity), except:

============== ===========================================================================
``dense``      no mask at all (the reference run)
``ste``        binary target mask (D = 0) from the end of the dense phase
``srste``      ``ste`` plus ``srste_lambda * (1 - mask) * W`` added to W's gradient (SR-STE)
``oneshot``    mask computed once by magnitude at the end of the dense phase and kept fixed;
               pruned weights get no gradient (ASP-style prune + fine-tune)
``mdgf-linear`` target mask, ``D(j) = max(1 - beta j, 0)``, j = steps since the dense phase
``mdgf-exp``   target mask, ``D(j) = exp(-beta j)``
``sdgf-stepwise``  binary masks walking (M-1):M, M/2:M, ..., N:M over the sparse window
``sdgf-geometric`` binary masks walking kN:kM, ..., N:M (k = ``geometric_k``)
============== ===========================================================================

Every masked method ends with a binary fine-tuning phase at the target pattern.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from nmflow.core.errors import ConfigError, is_whole_number
from nmflow.core.masks import NMPattern
from nmflow.core.schedules import DecaySchedule, PhasePlan, RunSchedule, exponential_decay, linear_decay

__all__ = [
    "MDGF_ONLY_SETTINGS",
    "METHODS",
    "METHOD_TABLE",
    "ROLES",
    "GradientRule",
    "MethodSpec",
    "Recipe",
    "takes_decay",
]


class GradientRule(str, Enum):
    """What reaches the dense weight W in the backward pass."""

    STRAIGHT_THROUGH = "ste"  # W_eff's gradient, unchanged, pruned weights included
    SRSTE = "srste"  # plus srste_lambda * (1 - mask) * W
    FROZEN = "frozen"  # pruned weights get none


@dataclass(frozen=True)
class MethodSpec:
    """What a method does; every module reads this table instead of testing method names."""

    gradient: GradientRule = GradientRule.STRAIGHT_THROUGH
    applies_masks: bool = True  # False: the dense reference run
    decay: str | None = None  # MDGF: "linear" or "exponential" D on pruned weights over the sparse phase
    walk: str | None = None  # SDGF: "stepwise" or "geometric" pattern walk over the sparse phase
    fixed_mask: bool = False  # the mask is taken once, at the end of the dense phase, and kept

    @property
    def progressive(self) -> bool:
        """Whether gradient flow to pruned weights is withdrawn gradually (the paper's MDGF and SDGF)."""
        return self.decay is not None or self.walk is not None


METHOD_TABLE: dict[str, MethodSpec] = {
    "dense": MethodSpec(applies_masks=False),
    "ste": MethodSpec(),
    "srste": MethodSpec(GradientRule.SRSTE),
    "oneshot": MethodSpec(GradientRule.FROZEN, fixed_mask=True),
    "mdgf-linear": MethodSpec(decay="linear"),
    "mdgf-exp": MethodSpec(decay="exponential"),
    "sdgf-stepwise": MethodSpec(walk="stepwise"),
    "sdgf-geometric": MethodSpec(walk="geometric"),
}
METHODS = tuple(METHOD_TABLE)


def takes_decay(method: str) -> bool:
    """Whether ``method`` (any name, e.g. one read from a run's config) is an MDGF method taking the decay settings."""
    spec = METHOD_TABLE.get(method)
    return spec is not None and spec.decay is not None


ROLES = ("ff", "experts", "q", "k", "v", "qk", "qkv", "attn_out")
"""Role names a recipe may use, besides ``re:<regex>`` on full module names."""

WALKS = ("stepwise", "geometric")
DEFAULT_DENSE_FRACTION = 0.05
DEFAULT_FINETUNE_FRACTION = 0.15
# The decay takes 25% of the run after the dense phase: with the default 5% dense phase, D reaches ~0 at 30% of the
# run. The paper advises ~70%; on validation data the two tie at 400 steps and 30% wins at 2000-4000 steps
# (docs/results/defaults). nmflow 0.1 ended the decay at 70% of the run.
DEFAULT_DECAY_FRACTION = 0.25
MDGF_ONLY_SETTINGS = ("beta", "decay_fraction", "decay_end_fraction")
"""Settings only the mdgf-* methods take; a sweep gives them to those methods of its grid only."""


@dataclass(frozen=True)
class Recipe:
    """A sparse-training recipe. Validated on construction and never changed afterwards.

    Args:
        method: one of `METHODS`.
        sparsity: role -> target pattern, e.g. ``{"ff": "1:16", "qk": "1:8"}``. Roles are `ROLES`
            or ``"re:<regex>"`` matched (``re.fullmatch``) against full module names.
        dense_fraction / dense_steps: length of the initial dense phase (give one; default 5%).
        finetune_fraction / finetune_steps: length of the final binary fine-tuning phase (default 15%).
        beta / decay_fraction / decay_end_fraction: MDGF only, how fast D decays (give at most one): a rate
            per optimizer step, or the rate that finishes the decay after ``decay_fraction`` of ``total_steps``
            from the end of the dense phase, or at ``decay_end_fraction`` of ``total_steps``. Finished: linear
            D is 0, exponential D is ``decay_end_value``. Default: ``decay_fraction`` 0.25, spelled out on
            construction so a saved recipe keeps its decay if the default moves.
        decay_end_value: the value exponential D has when the decay is finished (default 0.01).
        srste_lambda: SR-STE's decay on pruned weights (default 2e-4, as in the SR-STE code).
        geometric_k: first SDGF-geometric block multiplier, a power of two (default 16, the paper's).
        patterns: pattern walk. For ``sdgf-*``: an explicit sequence replacing the generated one,
            either one list for every role or a dict role -> list; each must end at that role's target.
            For ``mdgf-*``: ``"stepwise"``, ``"geometric"`` or a sequence, to combine the decay with a
            pattern walk (the paper's future work).
        skip_indivisible: skip, with a warning, layers whose input dimension M does not divide,
            instead of raising.
        exclude: regexes (``re.fullmatch`` on full module names) of layers to leave dense whatever their role.
    """

    method: str
    sparsity: Mapping[str, str | NMPattern] = field(default_factory=dict)
    dense_fraction: float | None = None
    dense_steps: int | None = None
    finetune_fraction: float | None = None
    finetune_steps: int | None = None
    beta: float | None = None
    decay_fraction: float | None = None
    decay_end_fraction: float | None = None
    decay_end_value: float = 0.01
    srste_lambda: float = 2e-4
    geometric_k: int = 16
    patterns: str | Sequence[str] | Mapping[str, Sequence[str]] | None = None
    skip_indivisible: bool = False
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        object.__setattr__(self, "sparsity", self._checked_sparsity())
        self._check_phases()
        self._check_decay()
        if not (isinstance(self.srste_lambda, (int, float)) and self.srste_lambda >= 0):
            raise ConfigError(f"srste_lambda must be a number >= 0, got {self.srste_lambda!r}")
        if not is_whole_number(self.geometric_k, minimum=1) or self.geometric_k & (self.geometric_k - 1):
            raise ConfigError(f"geometric_k must be a power of two >= 1, got {self.geometric_k!r}")
        object.__setattr__(self, "patterns", self._checked_patterns())
        object.__setattr__(self, "exclude", self._checked_exclude())

    # ----------------------------------------------------------------- validation
    def _checked_sparsity(self) -> dict[str, NMPattern]:
        if not isinstance(self.sparsity, Mapping):
            raise ConfigError(f"sparsity must map roles to patterns, e.g. {{'ff': '1:16'}}, got {self.sparsity!r}")
        if not self.sparsity and self.spec.applies_masks:
            raise ConfigError(f"method {self.method!r} needs at least one target in sparsity, e.g. {{'ff': '1:16'}}")
        checked = {}
        for role, pattern in self.sparsity.items():
            if not isinstance(role, str) or not (role in ROLES or role.startswith("re:")):
                raise ConfigError(f"unknown role {role!r}; choose from {', '.join(ROLES)} or 're:<regex>'")
            if role.startswith("re:"):
                try:
                    re.compile(role[3:])
                except re.error as err:
                    raise ConfigError(f"role {role!r}: invalid regular expression ({err})") from None
            try:
                checked[role] = NMPattern.parse(pattern)
            except ConfigError as err:
                raise ConfigError(f"role {role!r}: {err}") from None
        overlapping = [("q", "qk"), ("k", "qk"), ("q", "qkv"), ("k", "qkv"), ("v", "qkv"), ("qk", "qkv")]
        for a, b in overlapping:
            if a in checked and b in checked:
                raise ConfigError(f"roles {a!r} and {b!r} both claim the same projections; give only one")
        return checked

    def _checked_exclude(self) -> tuple[str, ...]:
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(f"exclude must be a list of regexes on module names, got {self.exclude!r}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"exclude {pattern!r}: invalid regular expression ({err})") from None
        return tuple(self.exclude)

    def _check_phases(self) -> None:
        for frac_name, steps_name in (("dense_fraction", "dense_steps"), ("finetune_fraction", "finetune_steps")):
            frac, steps = getattr(self, frac_name), getattr(self, steps_name)
            if frac is not None and steps is not None:
                raise ConfigError(f"give {frac_name} or {steps_name}, not both")
            if frac is not None and not (isinstance(frac, (int, float)) and 0 <= frac <= 1):
                raise ConfigError(f"{frac_name} must be within [0, 1], got {frac!r}")
            if steps is not None and not is_whole_number(steps):
                raise ConfigError(f"{steps_name} must be a whole number >= 0, got {steps!r}")
        if self._dense_fraction + self._finetune_fraction > 1:
            raise ConfigError(
                f"dense_fraction ({self._dense_fraction}) + finetune_fraction ({self._finetune_fraction}) exceed 1"
            )

    def _check_decay(self) -> None:
        is_mdgf = self.spec.decay is not None
        given = [name for name in MDGF_ONLY_SETTINGS if getattr(self, name) is not None]
        if given and not is_mdgf:
            raise ConfigError(f"{given[0]} only applies to the mdgf-* methods, not {self.method!r}")
        if len(given) > 1:
            raise ConfigError(f"give one of beta, decay_fraction and decay_end_fraction, not {' and '.join(given)}")
        if is_mdgf and not given:
            object.__setattr__(self, "decay_fraction", DEFAULT_DECAY_FRACTION)
        if self.beta is not None and not (
            isinstance(self.beta, (int, float)) and self.beta > 0 and math.isfinite(self.beta)
        ):
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta!r}")
        for name in ("decay_fraction", "decay_end_fraction"):
            fraction = getattr(self, name)
            if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
                raise ConfigError(f"{name} must be within (0, 1], got {fraction!r}")
        if not (isinstance(self.decay_end_value, (int, float)) and 0 < self.decay_end_value < 1):
            raise ConfigError(f"decay_end_value must be within (0, 1), got {self.decay_end_value!r}")

    def _checked_patterns(self) -> str | tuple[NMPattern, ...] | dict[str, tuple[NMPattern, ...]] | None:
        value = self.patterns
        if value is None:
            return None
        if not self.spec.progressive:
            raise ConfigError(f"patterns only apply to the sdgf-* and mdgf-* methods, not {self.method!r}")
        if isinstance(value, str):
            if value not in WALKS:
                raise ConfigError(f"patterns must be 'stepwise', 'geometric' or a list of 'N:M', got {value!r}")
            if self.spec.walk is not None:
                raise ConfigError(f"{self.method} already walks its own sequence; give an explicit list or nothing")
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.sparsity)
            if unknown:
                raise ConfigError(f"patterns name roles that sparsity does not: {sorted(unknown)}")
            return {role: self._checked_sequence(role, seq) for role, seq in value.items()}
        return {role: self._checked_sequence(role, value) for role in self.sparsity}

    def _checked_sequence(self, role: str, sequence: Any) -> tuple[NMPattern, ...]:
        if isinstance(sequence, str) or not isinstance(sequence, Sequence) or not sequence:
            raise ConfigError(f"patterns for role {role!r} must be a non-empty list of 'N:M', got {sequence!r}")
        parsed = tuple(NMPattern.parse(p) for p in sequence)
        if parsed[-1] != self.sparsity[role]:
            raise ConfigError(
                f"patterns for role {role!r} must end at its target {self.sparsity[role]}, not {parsed[-1]}"
            )
        return parsed

    # ----------------------------------------------------------------- derived values
    @property
    def spec(self) -> MethodSpec:
        """What this recipe's method does (`METHOD_TABLE`)."""
        return METHOD_TABLE[self.method]

    @property
    def _dense_fraction(self) -> float:
        if self.dense_fraction is not None:
            return self.dense_fraction
        return 0.0 if self.dense_steps is not None else DEFAULT_DENSE_FRACTION

    @property
    def _finetune_fraction(self) -> float:
        if self.finetune_fraction is not None:
            return self.finetune_fraction
        return 0.0 if self.finetune_steps is not None else DEFAULT_FINETUNE_FRACTION

    @property
    def walk(self) -> str | None:
        """``"stepwise"``, ``"geometric"``, ``"explicit"`` or None (fixed target pattern)."""
        if isinstance(self.patterns, dict):
            return "explicit"
        if self.patterns is not None:
            return self.patterns
        return self.spec.walk

    def phase_plan(self, total_steps: int) -> PhasePlan:
        if not is_whole_number(total_steps, minimum=1):
            raise ConfigError(f"total_steps must be a whole number >= 1, got {total_steps!r}")
        dense = self.dense_steps if self.dense_steps is not None else round(self._dense_fraction * total_steps)
        finetune = (
            self.finetune_steps
            if self.finetune_steps is not None
            else min(round(self._finetune_fraction * total_steps), total_steps - dense)
        )
        return PhasePlan(total_steps, dense, finetune)

    def resolved_beta(self, total_steps: int) -> float | None:
        """The MDGF rate per step: ``beta`` if given, else the one that finishes the decay on time."""
        if self.spec.decay is None:
            return None
        if self.beta is not None:
            return float(self.beta)
        if self.decay_fraction is not None:
            length = max(1, round(self.decay_fraction * total_steps))
        else:
            dense_steps, end = self.phase_plan(total_steps).dense_steps, round(self.decay_end_fraction * total_steps)
            if end <= dense_steps:
                raise ConfigError(
                    f"the MDGF decay would end (decay_end_fraction={self.decay_end_fraction}, step {end}) before "
                    f"the dense phase does (step {dense_steps}); give a later end or decay_fraction instead"
                )
            length = end - dense_steps
        if self.spec.decay == "linear":
            return 1.0 / length
        return math.log(1.0 / self.decay_end_value) / length

    def decay_schedule(self, total_steps: int) -> DecaySchedule | None:
        beta = self.resolved_beta(total_steps)
        if beta is None:
            return None
        return linear_decay(beta) if self.spec.decay == "linear" else exponential_decay(beta)

    def schedule(self, total_steps: int) -> RunSchedule:
        """This recipe over a run of ``total_steps`` optimizer steps; raises if the run cannot hold it."""
        plan = self.phase_plan(total_steps)
        return RunSchedule(
            plan, self.spec.applies_masks, self.decay_schedule(total_steps), self.resolved_beta(total_steps)
        )

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain types only (str, int, float, list, dict), for YAML/JSON and `weights_only` loads."""
        data = asdict(self)
        data["sparsity"] = {role: str(p) for role, p in self.sparsity.items()}
        data["exclude"] = list(self.exclude)
        if isinstance(self.patterns, dict):
            data["patterns"] = {role: [str(p) for p in seq] for role, seq in self.patterns.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown recipe keys {unknown}; known keys: {', '.join(sorted(known))}")
        if "method" not in data:
            raise ConfigError("recipe needs a 'method'")
        return cls(**data)
