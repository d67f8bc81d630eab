"""The exceptions nmflow raises for bad input, so callers can catch them by kind, and the checks they share."""

from __future__ import annotations


class NmflowError(Exception):
    """Base class of every error nmflow raises on purpose."""


class ConfigError(NmflowError, ValueError):
    """A recipe, pattern, option or config file that cannot be used as given."""


class NoMatchingTargetError(ConfigError):
    """A role or regex in the recipe matched no layer of the model."""


class NonFiniteWeightError(NmflowError, ValueError):
    """A weight holds NaN or inf when a mask is to be computed from it."""


class FinalizedError(NmflowError, RuntimeError):
    """The sparsifier was used after `finalize()` handed the plain model back."""


class CheckpointError(NmflowError):
    """A checkpoint that is missing, truncated, corrupted, of another format or of another run."""


def is_whole_number(value: object, minimum: int | None = 0) -> bool:
    """Whether ``value`` is an int (not a bool, which Python counts as one) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return minimum is None or value >= minimum
