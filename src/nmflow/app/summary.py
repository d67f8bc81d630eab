"""The summary of a finished run: what `nmflow train` prints at the end and writes to ``summary.json``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from nmflow import __version__
from nmflow.app.config import TrainConfig
from nmflow.app.tasks import Task
from nmflow.core.sparsifier import Sparsifier
from nmflow.flops import FlopsCount, training_flops

__all__ = ["format_summary", "run_summary", "scores"]


def scores(split: str, evaluated: Mapping[str, float], task: Task) -> dict[str, float]:
    """``{"loss": .., "accuracy": ..}`` -> ``{"val_loss": .., "val_accuracy": ..}``: the loss and the task's metric."""
    return {f"{split}_{name}": evaluated[name] for name in ("loss", task.metric)}


def run_summary(
    config: TrainConfig,
    task: Task,
    sp: Sparsifier,
    model: nn.Module,
    per_example: FlopsCount,
    layers: list[dict],
    evaluated: Mapping[str, Mapping[str, float]],
    wall_time_s: float,
    out: Path,
) -> dict[str, Any]:
    """The summary of a finalized run: ``layers`` is what `Sparsifier.verify` found, ``evaluated`` holds the scores
    of the ``val`` and ``test`` splits."""
    test, val = evaluated["test"], evaluated["val"]
    return {
        "task": task.name,
        "metric": task.metric,
        "method": config.method,
        "sparsity": sp.recipe.to_dict()["sparsity"],
        "steps": config.steps,
        "seed": config.seed,
        "data_seed": config.data_seed,
        "init_from": config.init_from,
        "phases": _phases(sp),
        "beta": sp.schedule.beta,
        **scores("test", test, task),
        "test_examples": test["examples"],  # images, or predicted bytes
        "test_data": task.describe(),
        **scores("val", val, task),
        "layers": layers,
        "sparsified_weights": {"kept": sum(r["kept"] for r in layers), "total": sum(r["total"] for r in layers)},
        "model_parameters": {
            "nonzero": sum(int(p.count_nonzero()) for p in model.parameters()),
            "total": sum(p.numel() for p in model.parameters()),
        },
        "inference_flops": {"dense": per_example.dense_total, "sparse": round(per_example.total)},
        "training_flops": training_flops(sp, per_example, config.batch_size),
        "wall_time_s": round(wall_time_s, 1),
        "out": str(out),
        "nmflow_version": __version__,
    }


def _phases(sp: Sparsifier) -> dict[str, list[int]]:
    plan = sp.plan
    if not sp.schedule.masked:
        return {"dense": [0, plan.total_steps]}
    return {
        "dense": [0, plan.sparse_start],
        "sparse": [plan.sparse_start, plan.finetune_start],
        "finetune": [plan.finetune_start, plan.total_steps],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as printed at the end of a run."""
    sparsity = ", ".join(f"{role}={pattern}" for role, pattern in summary["sparsity"].items()) or "no targets"
    header = f"{summary['task']}, {summary['method']} ({sparsity}), {summary['steps']} steps, seed {summary['seed']}"
    lines = [f"nmflow train: {header}"]
    for split, label in (("test", "test"), ("val", "validation")):
        if summary["metric"] == "accuracy":
            name, score = "accuracy", f"{summary[f'{split}_accuracy']:.1%}"
        else:
            name, score = "loss", f"{summary[f'{split}_loss']:.4f} (perplexity {summary[f'{split}_perplexity']:.3f})"
        where = f" on {summary['test_data']}" if split == "test" else ""
        lines.append(f"  {label + ' ' + name:<20} {score}{where}")
    if summary["layers"]:
        lines.append(f"  sparsified layers    {len(summary['layers'])}, patterns checked after finalize:")
        width = max(len(r["layer"]) for r in summary["layers"])
        for r in summary["layers"]:
            lines.append(f"    {r['layer']:<{width}}  {r['role']:<4}  {r['realized']:<6}  exact")
    else:
        lines.append("  sparsified layers    none: the dense method trains the reference model")
    kept, params = summary["sparsified_weights"], summary["model_parameters"]
    if kept["total"]:
        lines.append(f"  sparsified weights   {_fraction(kept['kept'], kept['total'])} kept")
    flops = summary["inference_flops"]
    lines += [
        f"  model parameters     {_fraction(params['nonzero'], params['total'])} non-zero",
        f"  inference FLOPs      {flops['sparse']:,} per example ({flops['sparse'] / flops['dense']:.1%} of dense)",
        f"  training FLOPs       {summary['training_flops']:.3g}",
        f"  wall time            {summary['wall_time_s']:.1f} s",
        f"  output               {summary['out']}/ (config.yaml, metrics.jsonl, summary.json, model.safetensors,",
        "                       checkpoints/, and tensorboard/ when enabled)",
    ]
    return "\n".join(lines)


def _fraction(part: int, whole: int) -> str:
    return f"{part:,} of {whole:,} ({part / whole:.1%})"
