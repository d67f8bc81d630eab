"""Hugging Face `Trainer` integration: one callback runs a recipe over a Trainer's run.

    callback = NMSparsityCallback(Recipe("mdgf-exp", {"ff": "1:16"}))
    trainer = Trainer(model, args, train_dataset=data)
    callback.install(trainer)  # or Trainer(callbacks=[callback]): the same, but reporters miss the nmflow keys
    trainer.train()  # the model ends exact N:M and plain; callback.sparsifier.verify() reports it

The schedule counts optimizer steps (``state.global_step``), so gradient accumulation needs nothing
special; checkpoints carry the sparsifier state (``nmflow_sparsity.pt``) and ``resume_from_checkpoint``
continues the schedule where it stopped.

The model is sparsified when the callback meets the Trainer (at the end of ``Trainer.__init__``, or in
`install`), before ``trainer.train()`` wraps it for DDP: a weight parametrized after the wrapping would no
longer be synchronized across processes (torch's parametrization gives it a new gradient accumulator, which
DDP's hooks do not watch). The run's length is only known when training starts; the schedule is planned then.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import DefaultFlowCallback, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from nmflow.core.errors import ConfigError
from nmflow.core.recipes import Recipe
from nmflow.core.schedules import Phase
from nmflow.core.sparsifier import Sparsifier, sparsify
from nmflow.diagnostics import StepDiagnostics

__all__ = ["STATE_FILE", "NMSparsityCallback"]

STATE_FILE = "nmflow_sparsity.pt"
"""The sparsifier state inside each Trainer checkpoint folder."""

_PROVISIONAL_STEPS = 1_000_000  # any length the recipe accepts: the plan is redone before the first step

PHASE_CODES = {Phase.DENSE: 0, Phase.SPARSE: 1, Phase.FINETUNE: 2}
"""``nmflow/phase`` is logged as a number, since most reporters (MLflow, AzureML, ...) keep numbers only."""


class NMSparsityCallback(TrainerCallback):
    """Sparsifies the Trainer's model with ``recipe`` over ``state.max_steps`` optimizer steps.

    Logged with every training log (``trainer.state.log_history`` and the reporters):
    ``nmflow/D`` (factor on pruned weights: 1 dense, D while decaying, 0 binary), ``nmflow/phase``
    (0 dense, 1 sparse, 2 finetune), ``nmflow/density/<key>`` (N/M kept per recipe key, 1.0 dense) and,
    with step-based logging, the diagnostics of the optimizer step that ended in the log, per recipe key
    (`nmflow.diagnostics`): ``nmflow/grad_abs_var/<key>``, ``nmflow/exp_avg_sq_var/<key>`` and
    ``nmflow/exp_avg_sq_norm/<key>`` (Adam-type optimizers) and ``nmflow/flip_rate/<key>``.
    """

    def __init__(self, recipe: Recipe, *, verbose: bool = True) -> None:
        if not isinstance(recipe, Recipe):
            raise TypeError(f"NMSparsityCallback needs an nmflow.Recipe, got {type(recipe).__name__}")
        self.recipe = recipe
        self.verbose = verbose
        self.sparsifier: Sparsifier | None = None
        self._diagnostics: StepDiagnostics | None = None
        self._record: tuple[int, dict[str, dict[str, float]]] | None = None  # (global step, diagnostics)
        self._installed = False
        self._diagnosing = False

    def install(self, trainer: Trainer) -> Trainer:
        """Register with ``trainer`` ahead of its reporters, which only see log keys added before they run.

        It goes right after `DefaultFlowCallback`; running before the reporters also means that at the end
        of training they save the finalized (exact N:M) model.
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        self._installed = True
        if self.sparsifier is None:
            self._attach(trainer.model, trainer.args)
        return trainer

    def _attach(self, model: torch.nn.Module, args: TrainingArguments) -> None:
        # planned for max_steps when given; else provisionally, until on_train_begin knows the run's length
        steps = args.max_steps if args.max_steps > 0 else _PROVISIONAL_STEPS
        self.sparsifier = sparsify(model, self.recipe, total_steps=steps, verbose=False)

    # ----------------------------------------------------------------- lifecycle
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.sparsifier is None and kwargs.get("model") is not None:
            self._attach(kwargs["model"], args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The Trainer has built the optimizer and, on resume, loaded the checkpoint's weights by now;
        # the parametrization keeps each weight's Parameter object, so the optimizer still holds it.
        if self.sparsifier is None:
            if args.world_size > 1:
                raise ConfigError(
                    "NMSparsityCallback was added after the Trainer was built, and the model is now wrapped for "
                    "several processes, where a weight sparsified this late is no longer synchronized; pass it "
                    "in Trainer(callbacks=[...]) or call callback.install(trainer) before trainer.train()"
                )
            self._attach(kwargs["model"], args)
        if any(args.report_to) and not self._installed:
            warnings.warn(
                "NMSparsityCallback runs after the Trainer's reporters, which will not see the nmflow/* keys; "
                "register it with callback.install(trainer) instead",
                stacklevel=2,
            )
        if self.sparsifier.total_steps != state.max_steps:
            self.sparsifier.reschedule(state.max_steps)
        if self.verbose and state.is_world_process_zero:
            print(self.sparsifier.table)
        if state.global_step > 0:
            self._resume(args, state)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # only for a step that ends in a log: reading the masks costs a top-k per weight
        self._diagnosing = _log_due(args, state, state.global_step + 1)
        if self._diagnosing:
            # gradients after accumulation, all-reduce and clipping: what the optimizer is about to use
            if self._diagnostics is None or self._diagnostics.optimizer is not kwargs.get("optimizer"):
                self._diagnostics = StepDiagnostics(self.sparsifier, kwargs.get("optimizer"))
            self._diagnostics.after_backward()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.sparsifier.step()
        self._record = (state.global_step, self._diagnostics.after_step()) if self._diagnosing else None
        self._diagnosing = False

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.sparsifier is None:
            return  # only the periodic training logs: not evaluation, nor the end-of-run summary
        extra = self._metrics(state)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer appended a copy of ``logs`` just before this call

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.should_save and self.sparsifier is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self.sparsifier.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.sparsifier.finalize()

    # ----------------------------------------------------------------- helpers
    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        sp = self.sparsifier
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if os.path.isfile(path):
            sp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return
        rebuilt = sp.state_dict()
        rebuilt["step"] = state.global_step
        del rebuilt["checksum"]  # an edited state: its checksum would (rightly) refuse it
        lost = "the schedule is a function of the step, so nothing else was lost"
        if self.recipe.spec.fixed_mask and sp.schedule.phase(state.global_step) is not Phase.DENSE:
            lost = "the one-shot masks are lost and recomputed from the resumed weights"
        warnings.warn(
            f"no {STATE_FILE} in the checkpoint of step {state.global_step} under {args.output_dir}; "
            f"the sparsity schedule resumes from the step alone: {lost}",
            stacklevel=3,
        )
        sp.load_state_dict(rebuilt)

    def _metrics(self, state: TrainerState) -> dict[str, float]:
        sp = self.sparsifier
        status = sp.status()
        binary_or_dense = 1.0 if status.phase is Phase.DENSE else 0.0
        decay = binary_or_dense if status.decay is None else status.decay
        metrics = {"nmflow/D": decay, "nmflow/phase": PHASE_CODES[status.phase]}
        metrics.update({f"nmflow/density/{key}": value for key, value in status.density.items()})
        if self._record is not None and self._record[0] == state.global_step:
            for name, per_key in self._record[1].items():
                metrics.update({f"nmflow/{name}/{key}": value for key, value in per_key.items()})
        self._record = None
        return metrics


def _log_due(args: TrainingArguments, state: TrainerState, step: int) -> bool:
    """Whether `DefaultFlowCallback` will ask for a training log once ``global_step`` reaches ``step``."""
    if step == 1 and args.logging_first_step:
        return True
    return args.logging_strategy == "steps" and state.logging_steps > 0 and step % state.logging_steps == 0
