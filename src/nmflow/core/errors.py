"""The exceptions nmflow raises for bad input, so callers can catch them by kind."""

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
