"""`plan(model, recipe, total_steps)`: what `sparsify` would take, as the table it prints; the model is untouched."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nmflow.core.errors import ConfigError
from nmflow.core.recipes import Recipe
from nmflow.core.sparsifier import Sparsifier
from nmflow.core.targets import Target, resolve_targets

__all__ = ["Plan", "plan"]


@dataclass(frozen=True)
class Plan:
    """What `sparsify` would take: the targets and the table it prints. The model is not touched."""

    targets: tuple[Target, ...]
    table: str

    def __str__(self) -> str:
        return self.table


def plan(model: nn.Module, recipe: Recipe, total_steps: int, *, verbose: bool = True) -> Plan:
    """Inspect a recipe on a model: the layers, roles, rows and patterns `sparsify` would take, as a table.

    Runs every check `sparsify` runs on the recipe and the layers (raising the same errors) but attaches
    nothing; prints the table unless ``verbose=False``.
    """
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"plan needs an nmflow.Recipe, got {type(recipe).__name__}")
    recipe.phase_plan(total_steps)
    recipe.resolved_beta(total_steps)
    targets = resolve_targets(model, recipe)
    table = Sparsifier(model, recipe, total_steps, targets).table  # an unattached sparsifier only formats
    if verbose:
        print(table)
    return Plan(tuple(targets), table)
