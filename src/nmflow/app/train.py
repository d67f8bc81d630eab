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
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmflow.app.checkpoint import TrainingState, resume_from_checkpoint, save_checkpoint
from nmflow.app.config import TrainConfig, write_yaml
from nmflow.app.ranks import distributed, global_mean, launched_ranks, process_group, shared_choice
from nmflow.app.runlog import RunLog
from nmflow.app.summary import format_summary, run_summary
from nmflow.app.tasks import VIT_CONFIG, Task, build_task
from nmflow.core.errors import ConfigError
from nmflow.core.sparsifier import sparsify
from nmflow.diagnostics import StepDiagnostics
from nmflow.flops import count_inference_flops, final_densities, training_flops, training_flops_until

__all__ = ["VIT_CONFIG", "format_summary", "learning_rate", "train"]

MIN_LR_RATIO = 0.1  # the cosine ends at lr / 10, as in nanoGPT (after Chinchilla)
SEED_LIMIT = 2**32  # scikit-learn's random_state takes seeds below 2**32


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


def train(config: TrainConfig, *, overwrite: bool = False, verbose: bool = True, resume: bool = False) -> dict:
    """Run ``config`` from data to saved model and return the summary (also written to ``summary.json``).

    A `ConfigError` (bad output folder, data, a recipe that does not fit the model) comes before anything is written.
    ``overwrite`` allows a non-empty output folder; ``verbose=False`` prints nothing; ``resume=True`` continues the
    run in ``config.out`` from its newest checkpoint (see `nmflow.app.config.resume_config`).
    """
    started = time.perf_counter()
    config = _resolve_tensorboard(config)
    ranks = launched_ranks()
    own = ranks.share(config.batch_size)  # this process's slice of every global batch
    with process_group(ranks, config.device) as device, _torch_threads(config.threads):
        # ---- setup: data, model, recipe, optimizer; a resumed run continues from its newest checkpoint
        task = _task(config, device)
        out = Path(config.out) if resume else shared_choice(ranks, lambda: _output_folder(config, overwrite))
        main = ranks.is_main  # only rank 0 writes and prints
        verbose = verbose and main
        torch.manual_seed(config.seed)
        model = task.build_model()
        if config.init_from is not None and not resume:
            _load_initial_weights(model, config.init_from)
        sp = sparsify(model, config.recipe(), total_steps=config.steps, verbose=verbose)  # checks the recipe fits
        per_example = count_inference_flops(model, **task.example_inputs(), densities=final_densities(sp))
        optimizer = _optimizer(model, config)
        diagnostics = StepDiagnostics(sp, optimizer) if config.diagnostics else None
        batch_rng = torch.Generator().manual_seed(config.seed)  # the same global batches in every process
        batches = task.train_batches(config.batch_size, batch_rng)
        if resume:
            first_step = resume_from_checkpoint(out, config, model, optimizer, sp, batches, batch_rng, cut_metrics=main)
        else:
            first_step = _start(out, config, main)
        forward = distributed(model, device, ranks)
        purge = first_step + 1 if resume else None
        log = RunLog(out, task.metric, writes=main, tensorboard=config.tensorboard, purge_step=purge)

        # ---- the loop: one optimizer step, then the sparsifier's step, then logging, evaluation and checkpoints
        model.train()
        progress = _progress_bar(first_step, config.steps, verbose)
        for step in progress:
            status = sp.status()  # the phase, D and patterns of this step's forward pass
            lr = learning_rate(step, config)
            _set_learning_rate(optimizer, lr)
            done = step + 1
            logged = done % config.log_every == 0 or done == config.steps
            evaluated = done % config.eval_every == 0 and done < config.steps and main
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

            if logged or evaluated:
                flops = training_flops_until(sp, per_example, config.batch_size, done)
            if logged:
                statistics = diagnostics.after_step() if diagnostics is not None else {}
                line = log.training(done, global_mean(loss.detach(), ranks), lr, status, flops, statistics)
                progress.set_postfix(loss=f"{line['loss']:.3f}", phase=line["phase"], refresh=False)
            if evaluated:
                log.validation(done, task.evaluate(model, "val"), flops)
            if done % config.save_every == 0 or done == config.steps:
                if main:
                    log.flush()
                    state = TrainingState.now(done, optimizer, sp, batch_rng, log.bytes_written(), config.resolved(out))
                    save_checkpoint(out, model, state.as_dict(), keep=config.keep_checkpoints)
                ranks.barrier()  # no process runs ahead of a checkpoint being written

        # ---- finish: exact N:M weights (the same in every process), checked, scored, saved
        sp.finalize()
        layers = sp.verify()  # raises if any group holds more than N non-zeros
        evaluated = _evaluate_final(task, model, log, config.steps, training_flops(sp, per_example, config.batch_size))
        if main:
            with _quiet_transformers_progress():
                model.save_pretrained(out)
    summary = run_summary(config, task, sp, model, per_example, layers, evaluated, time.perf_counter() - started, out)
    return _publish(summary, out if main else None, verbose)


# ----------------------------------------------------------------------------- helpers
def _start(out: Path, config: TrainConfig, main: bool) -> int:
    """A new run: rank 0 writes its ``config.yaml``; it starts at step 0."""
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / "config.yaml", config.resolved(out))
    return 0


def _evaluate_final(task: Task, model: nn.Module, log: RunLog, step: int, flops: int) -> dict[str, dict[str, float]]:
    """Score the finalized model: its validation line closes the log, then the only look at the test split."""
    val = task.evaluate(model, "val")
    log.validation(step, val, flops, finalized=True)
    log.close()
    return {"val": val, "test": task.evaluate(model, "test")}


def _publish(summary: dict[str, Any], out: Path | None, verbose: bool) -> dict[str, Any]:
    """Write ``summary.json`` into ``out`` (rank 0 only: None elsewhere) and print the summary if ``verbose``."""
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if verbose:
        print(format_summary(summary))
    return summary


def _set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _task(config: TrainConfig, device: torch.device) -> Task:
    return build_task(
        config.task,
        data=config.data,
        data_seed=config.data_seed,
        model=config.model,
        device=device,
        block_size=config.block_size,
        image_size=config.image_size,
    )


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
