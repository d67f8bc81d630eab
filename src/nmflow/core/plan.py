"""`plan(model, recipe, total_steps)`: what `sparsify` would take, as the table it prints; the model is untouched.

The table and the count of schedule states are pure functions of the recipe's `RunSchedule` and its targets, so
`plan` and `Sparsifier.table` print the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from nmflow.core.errors import ConfigError
from nmflow.core.recipes import Recipe
from nmflow.core.schedules import RunSchedule
from nmflow.core.targets import Target, resolve_targets

__all__ = ["DYNAMO_RECOMPILE_LIMIT", "Plan", "layer_table", "plan", "schedule_states"]

DYNAMO_RECOMPILE_LIMIT = 8  # torch._dynamo.config.recompile_limit's default


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
    schedule = recipe.schedule(total_steps)
    targets = tuple(resolve_targets(model, recipe))
    shapes = [tuple(getattr(t.module, t.param_name).shape) for t in targets]
    table = layer_table(recipe, schedule, targets, shapes)
    if verbose:
        print(table)
    return Plan(targets, table)


def schedule_states(schedule: RunSchedule, targets: Sequence[Target]) -> int:
    """How many distinct (patterns, soft masks) states the run passes through.

    Under ``torch.compile`` each state is one graph, and dynamo stops compiling past
    ``torch._dynamo.config.recompile_limit`` (8 by default) graphs per function.
    """
    walks = [seg.sequence for t in targets for seg in t.segments]
    states = {
        (tuple(schedule.pattern_at(walk, step) for walk in walks), schedule.soft(step))
        for step in schedule.change_points(len(walk) for walk in walks)
    }
    return len(states)


def layer_table(recipe: Recipe, schedule: RunSchedule, targets: Sequence[Target], shapes: Sequence[tuple]) -> str:
    """The layers taken: name, role, shape (``shapes``, one per target), rows, grouping dimension, target, walk."""
    rows = [("layer", "role", "shape", "rows", "in-dim", "target", "schedule")]
    for t, shape in zip(targets, shapes):
        for seg in t.segments:
            walk = " > ".join(str(p) for p in seg.sequence) if len(seg.sequence) > 1 else ""
            target = str(seg.target) if schedule.masked else "dense"
            shape_text = "x".join(str(s) for s in shape)
            rows.append((t.qualified_name, seg.role, shape_text, t.rows_text(seg), str(t.in_dim), target, walk))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    phases = schedule.plan
    header = f"nmflow: {recipe.method}, {len(targets)} tensors, {schedule.total_steps} steps "
    if not schedule.masked:
        header += "(reference run: no masks)"
    else:
        header += (
            f"(dense 0-{phases.sparse_start}, sparse {phases.sparse_start}-{phases.finetune_start}, "
            f"finetune {phases.finetune_start}-{phases.total_steps})"
        )
    if schedule.beta is not None:
        header += f", beta={schedule.beta:.4g}"
    states = schedule_states(schedule, targets)
    if states > DYNAMO_RECOMPILE_LIMIT:
        header += (
            f"\nnote: {states} schedule states; under torch.compile each is one graph, so raise "
            f"torch._dynamo.config.recompile_limit above its default {DYNAMO_RECOMPILE_LIMIT}"
        )
    return header + "\n" + "\n".join(lines)
