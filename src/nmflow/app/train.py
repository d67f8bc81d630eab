"""`nmflow train`: train a small transformer under an N:M recipe, verify the pattern, save the model.

    nmflow train                                          # vision: ViT on the digits, mdgf-exp, ff=1:16, 1000 steps
    nmflow train --task language --method srste --steps 400   # byte-level GPT-2 on CPython's pydoc text
    nmflow train --task vision --data my_images/ --image-size 32  # your own image folder or .npz file
    nmflow train --method srste --sparsity ff=1:16 --sparsity qk=1:8 --steps 2000
    nmflow train --config run.yaml --seed 3               # flags override the file
    nmflow train --resume runs/mdgf-exp-20250101-120000   # continue a run from its latest checkpoint
    nmflow train --method mdgf-exp --init-from runs/dense # continue a finished (dense) run under a recipe

The tasks, their models and data are in `nmflow.app.tasks`. From Python:
``summary = train(TrainConfig(method="ste", steps=300))``.

A run writes into its output folder:

* ``config.yaml``: the resolved config; ``--config`` takes it back.
* ``metrics.jsonl``: one JSON object per line. Training lines hold ``step`` (optimizer steps done, from 1),
  ``loss``, ``lr``, the ``phase``, ``D``, ``patterns`` and ``density`` (per recipe key) that step's forward pass
  used, ``train_flops`` (cumulative, see `nmflow.flops`) and, unless ``diagnostics`` is off, the statistics of
  `nmflow.diagnostics` per recipe key: ``grad_abs_var``, ``exp_avg_sq_var``, ``exp_avg_sq_norm``, ``flip_rate``.
  Evaluation lines hold ``step``, ``val_loss`` and ``val_accuracy`` (vision) or ``val_perplexity`` (language),
  and ``train_flops``; the last one, marked ``finalized``, evaluates the finalized model.
* ``summary.json``: what the run prints at the end. The test split is evaluated there, once.
* ``model.safetensors`` + ``config.json``: the finalized model, for ``ViTForImageClassification`` or
  ``GPT2LMHeadModel.from_pretrained``.
* ``checkpoints/step-<N>/``: every ``save_every`` steps and at the last one, the newest ``keep_checkpoints``
  kept (see `nmflow.app.checkpoint`). ``--resume`` continues from the newest; on one CPU thread the resumed run
  ends with the same weights, bit for bit, and the same ``metrics.jsonl`` as a run never stopped.
* ``tensorboard/``: the scalars of the metrics lines (``train/loss``, ``train/lr``, ``train/D``,
  ``density/<key>``, ``grad_abs_var/<key>``, ..., ``val/loss``, ``val/<metric>``), unless ``--no-tensorboard``.
  The default writes them when the ``tensorboard`` package is installed (it is in the ``train`` extra).

Launched by ``torchrun --nproc_per_node=K`` (``WORLD_SIZE`` > 1), the same command trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA, one GPU per process): every process draws the same
global batch of ``batch_size`` and trains on its contiguous share of ``batch_size / K`` examples, so the
run matches a single process up to rounding. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
import types
import typing
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nmflow import __version__
from nmflow.app.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint, restore, save_checkpoint
from nmflow.app.tasks import TASKS, VIT_CONFIG, Task, build_task
from nmflow.core.errors import ConfigError
from nmflow.core.recipes import METHODS, Recipe
from nmflow.core.sparsifier import Sparsifier, sparsify
from nmflow.diagnostics import StepDiagnostics
from nmflow.flops import count_inference_flops, final_densities, training_flops, training_flops_until

__all__ = [
    "RESUME_OVERRIDES",
    "VIT_CONFIG",
    "TrainConfig",
    "format_summary",
    "learning_rate",
    "read_config_file",
    "resume_config",
    "train",
]

MIN_LR_RATIO = 0.1  # the cosine ends at lr / 10, as in nanoGPT (after Chinchilla)
SEED_LIMIT = 2**32  # scikit-learn's random_state takes seeds below 2**32


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field whose help text is also the CLI help, so the two cannot drift apart."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on, validated on construction. The fields are the keys of config files."""

    task: str = _option("vision", "what to train: vision (ViT, images) or language (GPT-2, bytes)", choices=TASKS)
    data: str | None = _option(
        None,
        "your own data: vision, an image folder or .npz file; language, a text file or a folder of them "
        "(default: scikit-learn's digits / CPython's pydoc text)",
        metavar="PATH",
    )
    model: dict[str, Any] = _option({}, "overrides of the task's HF model config, e.g. {'hidden_size': 128}", cli=False)
    block_size: int = _option(128, "language: context length in bytes", metavar="N")
    image_size: int | None = _option(None, "vision: resize your own images to this square size", metavar="N")
    init_from: str | None = _option(
        None, "start from the weights of a finished run (its folder) of the same task, e.g. a dense one", metavar="DIR"
    )
    diagnostics: bool = _option(True, "log gradient-noise, second-moment and mask-flip statistics with the loss")
    method: str = _option("mdgf-exp", "training method", choices=METHODS)
    sparsity: dict[str, str] = _option({"ff": "1:16"}, "target pattern per role, e.g. {'ff': '1:16', 'qk': '1:8'}")
    steps: int = _option(1000, "optimizer steps", metavar="N")
    seed: int = _option(0, "seed of the model initialization and of the batch order", metavar="N")
    data_seed: int = _option(
        0, "seed of the train/validation/test split, independent of the training seed", metavar="N"
    )
    out: str | None = _option(None, "output folder (default: runs/<method>-<date>-<time>)", metavar="DIR")
    device: str = _option("cpu", "torch device, e.g. cpu or cuda")
    threads: int = _option(1, "CPU threads of torch: this model is too small to gain from more", metavar="N")
    batch_size: int = _option(64, "training batch size", metavar="N")
    lr: float = _option(1e-3, "peak learning rate of AdamW")
    warmup_fraction: float = _option(0.05, "fraction of the steps that warm the learning rate up linearly", metavar="F")
    weight_decay: float = _option(
        0.05, "AdamW weight decay of matrices and embeddings, not biases or norms", metavar="X"
    )
    grad_clip: float = _option(1.0, "clip the gradient norm to this value (0: no clipping)", metavar="X")
    eval_every: int = _option(100, "evaluate on the validation split every N steps", metavar="N")
    log_every: int = _option(10, "write a metrics line every N steps", metavar="N")
    save_every: int = _option(200, "save a checkpoint every N steps, and at the last step", metavar="N")
    keep_checkpoints: int = _option(2, "keep the newest K checkpoints, delete older ones", metavar="K")
    tensorboard: bool | None = _option(
        None, "write TensorBoard scalars to <out>/tensorboard (default: when tensorboard is installed)"
    )
    # The recipe's options, passed on to nmflow.Recipe; None keeps the recipe's default.
    dense_fraction: float | None = _option(None, "fraction of the steps trained dense first (default: 5%)", metavar="F")
    dense_steps: int | None = _option(None, "length of the dense phase in steps, instead of a fraction", metavar="N")
    finetune_fraction: float | None = _option(
        None, "fraction of the steps fine-tuned at the target (default: 15%)", metavar="F"
    )
    finetune_steps: int | None = _option(
        None, "length of the fine-tuning phase in steps, instead of a fraction", metavar="N"
    )
    beta: float | None = _option(
        None, "MDGF decay rate per step (default: the one that ends the decay on time)", metavar="X"
    )
    decay_fraction: float | None = _option(
        None, "MDGF: fraction of the steps the decay takes after the dense phase (default: 0.25)", metavar="F"
    )
    decay_end_fraction: float | None = _option(
        None, "MDGF: fraction of the steps where the decay ends, instead of decay_fraction", metavar="F"
    )
    decay_end_value: float | None = _option(None, "MDGF-exp: D at the end of the decay (default: 0.01)", metavar="X")
    srste_lambda: float | None = _option(None, "SR-STE decay of the pruned weights (default: 2e-4)", metavar="X")
    geometric_k: int | None = _option(
        None, "SDGF-geometric first block multiplier, a power of two (default: 16)", metavar="K"
    )
    patterns: str | list[str] | dict[str, list[str]] | None = _option(
        None, "pattern walk: 'stepwise', 'geometric', a list of 'N:M' or a mapping role -> list", cli=False
    )
    skip_indivisible: bool = _option(False, "leave layers dense whose input size M does not divide, instead of failing")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ConfigError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        positive = ("steps", "threads", "batch_size", "eval_every", "log_every", "save_every", "keep_checkpoints")
        for name in (*positive, "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) < SEED_LIMIT:
                raise ConfigError(f"{name} must be within [0, 2**32), got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be within [0, 1), got {self.warmup_fraction!r}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {self.image_size!r}")
        if self.out is not None and not self.out.strip():
            raise ConfigError("out must name a folder, got an empty string")
        _check_device(self.device)
        recipe = self.recipe()
        recipe.phase_plan(self.steps)
        recipe.resolved_beta(self.steps)  # raises if the decay cannot end after the dense phase

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from plain data (a config file plus flags); unknown keys are an error, not ignored."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
        return cls(**data)

    def recipe(self) -> Recipe:
        options = {name: getattr(self, name) for name in RECIPE_OPTIONS if getattr(self, name) is not None}
        return Recipe(self.method, self.sparsity, **options)

    def resolved(self, out: Path) -> dict[str, Any]:
        """What ``config.yaml`` holds: every key with the value used, the recipe's defaults spelled out."""
        recipe = {k: v for k, v in self.recipe().to_dict().items() if k in (*RECIPE_OPTIONS, "sparsity")}
        return {"nmflow_version": __version__, **asdict(replace(self, out=str(out), **recipe))}


_RECIPE_ONLY = {f.name for f in fields(Recipe)} - {"method", "sparsity"}
RECIPE_OPTIONS = tuple(f.name for f in fields(TrainConfig) if f.name in _RECIPE_ONLY)
"""The config keys passed on to `nmflow.Recipe` as they are."""


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null"}
    return names.get(hint) or {dict: "a mapping", list: "a list"}[typing.get_origin(hint)]


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
        if device.type != "cpu":
            torch.empty(0, device=device)  # fails now, not after the data is loaded, if the device is absent
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"device {name!r} cannot be used: {err}") from None


# ----------------------------------------------------------------------------- config files
def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, unchecked: `TrainConfig.from_dict` checks the keys and values.

    Numbers follow YAML 1.2, as people write them: ``1e-3`` is a number (PyYAML alone reads text) and
    ``1:16`` is text (PyYAML alone reads the base-60 number 76). A ``nmflow_version`` key, written into
    every ``config.yaml``, is dropped, so a run's config file can be given back to ``--config``.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_yaml12_loader())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    data.pop("nmflow_version", None)
    return data


def _yaml12_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    numeric = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regex) for tag, regex in resolvers if tag not in numeric]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return Loader


# ----------------------------------------------------------------------------- training
def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then a cosine down to ``lr * MIN_LR_RATIO`` at the last step (``step`` is 0-based).

    A pure function of the step, like nmflow's own schedules, so a resumed run needs nothing else.
    """
    warmup = round(config.warmup_fraction * config.steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(config.steps - 1 - warmup, 1), 1.0)
    min_lr = config.lr * MIN_LR_RATIO
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - min_lr)


RESUME_OVERRIDES = ("save_every", "keep_checkpoints", "tensorboard")
"""Config keys ``--resume`` may change: they decide what is written, not what is computed."""


def resume_config(out: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config of the run in ``out``, read from its ``config.yaml``, for `train` with ``resume=True``.

    ``overrides`` may only hold `RESUME_OVERRIDES`: any other change would make the run another one.
    """
    overrides = dict(overrides or {})
    refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if refused:
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_OVERRIDES)
        raise ConfigError(
            f"--resume continues the run as its config.yaml says; {', '.join(refused)} would change it "
            f"(allowed with --resume: {allowed}, --no-tensorboard)"
        )
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume {out}: it holds no config.yaml; give the output folder of a run")
    return TrainConfig.from_dict({**read_config_file(path), **overrides, "out": str(out)})


def train(
    config: TrainConfig, *, overwrite: bool = False, verbose: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Run ``config`` from data to saved model and return the summary (also written to ``summary.json``).

    A `ConfigError` (bad output folder, data, or a recipe that does not fit the model) comes before anything is
    written. ``overwrite`` allows writing into a non-empty output folder; ``verbose=False`` prints nothing.
    ``resume=True`` continues the run in ``config.out`` from its newest checkpoint (see `resume_config`).
    """
    started = time.perf_counter()
    config = _resolve_tensorboard(config)
    ranks = _launched_ranks()
    if config.batch_size % ranks.world_size:
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by the number of processes ({ranks.world_size}): "
            "every process trains on an equal share of the global batch"
        )
    with _process_group(ranks, config.device) as device, _torch_threads(config.threads):
        task = build_task(
            config.task,
            data=config.data,
            data_seed=config.data_seed,
            model=config.model,
            device=device,
            block_size=config.block_size,
            image_size=config.image_size,
        )
        out = Path(config.out) if resume else _shared_output_folder(config, overwrite, ranks)
        verbose = verbose and ranks.is_main
        recipe = config.recipe()

        torch.manual_seed(config.seed)
        model = task.build_model()
        if config.init_from is not None and not resume:
            _load_initial_weights(model, config.init_from)
        sp = sparsify(model, recipe, total_steps=config.steps, verbose=verbose)  # checks the recipe fits the model
        per_example = count_inference_flops(model, **task.example_inputs(), densities=final_densities(sp))
        optimizer = _optimizer(model, config)
        diagnostics = StepDiagnostics(sp, optimizer) if config.diagnostics else None
        batch_rng = torch.Generator().manual_seed(config.seed)  # the same global batches in every process
        batches = task.train_batches(config.batch_size, batch_rng)
        share = config.batch_size // ranks.world_size
        own = slice(ranks.rank * share, (ranks.rank + 1) * share)

        first_step = 0
        if resume:
            first_step = _resume_from_checkpoint(out, config, model, optimizer, sp, batches, batch_rng, ranks)
        elif ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _write_yaml(out / "config.yaml", config.resolved(out))
        forward = model if ranks.world_size == 1 else _distributed(model, device)
        board = _summary_writer(out, config, purge_step=first_step + 1 if resume else None) if ranks.is_main else None
        model.train()
        progress = _progress_bar(first_step, config.steps, verbose)
        metrics_path = out / "metrics.jsonl" if ranks.is_main else Path(os.devnull)
        with open(metrics_path, "a" if resume else "w") as metrics:
            for step in progress:
                status = sp.status()  # the phase, D and patterns of this step's forward pass
                lr = learning_rate(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                done = step + 1
                logged = done % config.log_every == 0 or done == config.steps
                batch = {name: tensor[own] for name, tensor in next(batches).items()}
                loss = task.loss(forward, batch)  # mean: DDP averages the gradients
                loss.backward()
                if logged and diagnostics is not None:
                    diagnostics.after_backward()
                if config.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sp.step()

                evaluated = done % config.eval_every == 0 and done < config.steps and ranks.is_main
                if logged or evaluated:
                    flops = training_flops_until(sp, per_example, config.batch_size, done)
                if logged:
                    loss_value = _global_mean(loss.detach(), ranks)
                    line = {"step": done, "loss": loss_value, "lr": lr, "phase": str(status.phase), "D": status.decay}
                    line |= {"patterns": status.by_key, "density": status.density, "train_flops": flops}
                    if diagnostics is not None:
                        line |= diagnostics.after_step()
                    _write_line(metrics, line)
                    _log_scalars(board, done, {"train/loss": line["loss"], "train/lr": lr, "train/D": status.decay})
                    _log_scalars(board, done, _flat_scalars(line))
                    progress.set_postfix(loss=f"{line['loss']:.3f}", phase=line["phase"], refresh=False)
                if evaluated:
                    scores = task.evaluate(model, "val")
                    _write_line(metrics, {"step": done, **_prefixed("val", scores, task), "train_flops": flops})
                    _log_scalars(board, done, {f"val/{k}": scores[k] for k in ("loss", task.metric)})
                if done % config.save_every == 0 or done == config.steps:
                    if ranks.is_main:
                        if board is not None:
                            board.flush()
                        state = _training_state(done, config, out, optimizer, sp, batch_rng, metrics.tell())
                        save_checkpoint(out, model, state, keep=config.keep_checkpoints)
                    _barrier(ranks)  # no process runs ahead of a checkpoint being written

            sp.finalize()  # exact N:M zeros in the weights, the same in every process; plain modules from here on
            layers = sp.verify()  # raises if any group holds more than N non-zeros
            val = task.evaluate(model, "val")
            final = {"step": config.steps, "finalized": True, **_prefixed("val", val, task)}
            _write_line(metrics, {**final, "train_flops": training_flops(sp, per_example, config.batch_size)})
            _log_scalars(board, config.steps, {f"val/{k}": val[k] for k in ("loss", task.metric)})
        if board is not None:
            board.close()
        test = task.evaluate(model, "test")  # the only look at the test split
        if ranks.is_main:
            with _quiet_transformers_progress():
                model.save_pretrained(out)

    summary = {
        "task": task.name,
        "metric": task.metric,
        "method": config.method,
        "sparsity": recipe.to_dict()["sparsity"],
        "steps": config.steps,
        "seed": config.seed,
        "data_seed": config.data_seed,
        "init_from": config.init_from,
        "phases": _phases(sp),
        "beta": recipe.resolved_beta(config.steps),
        **_prefixed("test", test, task),
        "test_examples": test["examples"],  # images, or predicted bytes
        "test_data": task.describe(),
        **_prefixed("val", val, task),
        "layers": layers,
        "sparsified_weights": {"kept": sum(r["kept"] for r in layers), "total": sum(r["total"] for r in layers)},
        "model_parameters": {
            "nonzero": sum(int(p.count_nonzero()) for p in model.parameters()),
            "total": sum(p.numel() for p in model.parameters()),
        },
        "inference_flops": {"dense": per_example.dense_total, "sparse": round(per_example.total)},
        "training_flops": training_flops(sp, per_example, config.batch_size),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "out": str(out),
        "nmflow_version": __version__,
    }
    if ranks.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if verbose:
        print(format_summary(summary))
    return summary


def _prefixed(split: str, scores: Mapping[str, float], task: Task) -> dict[str, float]:
    """``{"loss": .., "accuracy": ..}`` -> ``{"val_loss": .., "val_accuracy": ..}``: the loss and the task's metric."""
    return {f"{split}_{name}": scores[name] for name in ("loss", task.metric)}


def _flat_scalars(line: Mapping[str, Any]) -> dict[str, float]:
    """The per-key statistics of a metrics line as TensorBoard tags, e.g. ``grad_abs_var/ff``."""
    return {
        f"{name}/{key}": value
        for name in ("density", "flip_rate", "grad_abs_var", "exp_avg_sq_var", "exp_avg_sq_norm")
        for key, value in line.get(name, {}).items()
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


# ----------------------------------------------------------------------------- helpers
def _output_folder(config: TrainConfig, overwrite: bool) -> Path:
    default = Path("runs") / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(config.out) if config.out is not None else default
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} is not empty; choose another --out or pass --overwrite")
    return out


def _load_initial_weights(model: nn.Module, run: str) -> None:
    """Copy the weights of a finished run (``run/model.safetensors``) into the freshly built ``model``.

    The model must be the same (task and model overrides); weights tied to a loaded one may be absent from the file,
    as ``save_pretrained`` writes them once.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(run) / "model.safetensors" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ConfigError(f"init_from {run}: no model.safetensors there; give the folder of a finished run")
    try:
        state = load_file(str(path), device=str(next(model.parameters()).device))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"init_from {path}: cannot read the weights: {err}") from None
    loaded = {id(model.get_parameter(name)) for name in state if name in dict(model.named_parameters())}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ConfigError(
            f"init_from {path}: the weights do not fit this model (same task and model?): {err}"
        ) from None
    untied = [name for name in result.missing_keys if id(model.get_parameter(name)) not in loaded]
    if untied or result.unexpected_keys:
        raise ConfigError(
            f"init_from {path}: the weights do not fit this model (same task and model?); "
            f"missing {untied[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW that decays matrices and embeddings but not biases or norm gains (as nanoGPT does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def _phases(sp: Sparsifier) -> dict[str, list[int]]:
    plan = sp.plan
    if not sp.schedule.masked:
        return {"dense": [0, plan.total_steps]}
    return {
        "dense": [0, plan.sparse_start],
        "sparse": [plan.sparse_start, plan.finetune_start],
        "finetune": [plan.finetune_start, plan.total_steps],
    }


def _progress_bar(first_step: int, steps: int, verbose: bool):
    from tqdm import tqdm

    # disable=None: silent when stdout is not a terminal (logs, pipes, CI)
    disable = None if verbose else True
    return tqdm(
        range(first_step, steps),
        initial=first_step,
        total=steps,
        desc="training",
        unit="step",
        file=sys.stdout,
        disable=disable,
    )


# ----------------------------------------------------------------------------- several processes (torchrun)
@dataclass(frozen=True)
class _Ranks:
    """This process's place in a torchrun launch; a plain run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_ranks() -> _Ranks:
    """Read from the variables torchrun sets; a single process without them."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return _Ranks()
        return _Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"WORLD_SIZE is set but the launch environment is incomplete or invalid: {err}") from None


@contextmanager
def _process_group(ranks: _Ranks, device_name: str):
    """The torch device of this process, inside a process group when there are several; destroyed on the way out.

    With CUDA each process takes GPU ``LOCAL_RANK``. A process group the caller initialized is used and left alone.
    """
    device = torch.device(device_name)
    if ranks.world_size == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        if owned:
            dist.destroy_process_group()


def _shared_output_folder(config: TrainConfig, overwrite: bool, ranks: _Ranks) -> Path:
    """Rank 0 picks and checks the output folder (the default name holds the time); every process gets it."""
    if ranks.world_size == 1:
        return _output_folder(config, overwrite)
    chosen: list[str | None] = [None, None]  # the folder, or the error message
    if ranks.is_main:
        try:
            chosen[0] = str(_output_folder(config, overwrite))
        except ConfigError as err:
            chosen[1] = str(err)
    dist.broadcast_object_list(chosen, src=0)
    if chosen[1] is not None:
        raise ConfigError(chosen[1])
    return Path(chosen[0])


def _distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the sparsified model: nmflow adds no parameter and every parameter gets a gradient."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def _global_mean(value: torch.Tensor, ranks: _Ranks) -> float:
    """The mean of a per-process mean over all processes: the loss of the whole global batch."""
    if ranks.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= ranks.world_size
    return value.item()


def _barrier(ranks: _Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- checkpoints and TensorBoard
def _training_state(
    step: int,
    config: TrainConfig,
    out: Path,
    optimizer: torch.optim.Optimizer,
    sp: Sparsifier,
    batch_rng: torch.Generator,
    metrics_bytes: int,
) -> dict[str, Any]:
    """Everything besides the weights that step ``step + 1`` depends on, and where metrics.jsonl ended."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "sparsifier": sp.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "batch_rng": batch_rng.get_state(),
        "batches_drawn": step,  # one batch per step: the data position
        "metrics_bytes": metrics_bytes,
        "config": config.resolved(out),
    }


def _resume_from_checkpoint(
    out: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sp: Sparsifier,
    batches: typing.Iterator[torch.Tensor],
    batch_rng: torch.Generator,
    ranks: _Ranks,
) -> int:
    """Load the newest checkpoint of ``out`` after checking all of it; returns the step to continue from.

    The batch order is replayed from the seed to the saved data position, then checked against the saved
    generator state. ``metrics.jsonl`` is cut back to its length at the checkpoint (by rank 0). Every process
    loads the same checkpoint.
    """
    checkpoint = read_checkpoint(latest_checkpoint(out))
    state_file = checkpoint.path / "training_state.pt"
    saved, current = dict(checkpoint.state["config"]), config.resolved(out)
    changed = sorted(k for k in set(saved) | set(current) if k not in _UNCOMPARED and saved.get(k) != current.get(k))
    if changed:
        raise CheckpointError(f"checkpoint file {state_file} belongs to another config: {', '.join(changed)} differ")
    metrics_path, metrics_bytes = out / "metrics.jsonl", checkpoint.state["metrics_bytes"]
    if not metrics_path.is_file() or metrics_path.stat().st_size < metrics_bytes:
        raise CheckpointError(
            f"{metrics_path} is shorter than the {metrics_bytes} bytes it had at step {checkpoint.step}"
        )
    for _ in range(checkpoint.state["batches_drawn"]):
        next(batches)
    if not torch.equal(batch_rng.get_state(), checkpoint.state["batch_rng"]):
        raise CheckpointError(f"checkpoint file {state_file}: the batch order replayed from the seed differs")
    restore(checkpoint, model, optimizer, sp)
    torch.set_rng_state(checkpoint.state["torch_rng"])
    if ranks.is_main:
        os.truncate(metrics_path, metrics_bytes)
    return checkpoint.step


_UNCOMPARED = {"nmflow_version", "out", *RESUME_OVERRIDES}


def _resolve_tensorboard(config: TrainConfig) -> TrainConfig:
    """``tensorboard=None`` becomes whether the package is installed; ``True`` without it is an error."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if config.tensorboard is None:
        return replace(config, tensorboard=installed)
    if config.tensorboard and not installed:
        raise ConfigError(
            "tensorboard logging needs the tensorboard package: pip install tensorboard "
            "(it comes with nmflow[train]), or pass --no-tensorboard"
        )
    return config


def _summary_writer(out: Path, config: TrainConfig, purge_step: int | None):
    """A TensorBoard writer, or None; ``purge_step`` hides what a stopped run logged after its checkpoint."""
    if not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)


def _log_scalars(board, step: int, values: Mapping[str, float | None]) -> None:
    if board is None:
        return
    for tag, value in values.items():
        if value is not None:
            board.add_scalar(tag, value, step)


def _write_line(file, record: Mapping[str, Any]) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()


def _write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))


@contextmanager
def _torch_threads(count: int):
    """Run with ``count`` intra-op CPU threads, then give the caller back its own setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_transformers_progress():
    """Hide the one-shard "Writing model shards" bar of ``save_pretrained``; restore the setting afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
