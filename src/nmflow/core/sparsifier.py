"""`sparsify(model, recipe, total_steps)`: attach a recipe to any model, then step it like an LR scheduler.

    sp = nmflow.sparsify(model, nmflow.Recipe("mdgf-exp", {"ff": "1:16"}), total_steps=T)
    for batch in data:
        loss(model(batch)).backward()
        optimizer.step(); optimizer.zero_grad()
        sp.step()
    sp.finalize()  # exact N:M zeros in the weights, plain modules again

The t-th forward pass (t = number of `step()` calls so far) runs under the schedule at step t,
which is a pure function of t: resuming needs only `state_dict()` (the step, and the mask of a
one-shot recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmflow.core.checksums import state_checksum as _checksum
from nmflow.core.errors import ConfigError, FinalizedError, NmflowError, NonFiniteWeightError, is_whole_number
from nmflow.core.masks import NMPattern, realized_n
from nmflow.core.parametrization import NMParametrization
from nmflow.core.plan import layer_table, schedule_states
from nmflow.core.recipes import Recipe, takes_decay
from nmflow.core.schedules import Phase, PhasePlan, RunSchedule
from nmflow.core.targets import Segment, Target, is_sharded, resolve_targets

__all__ = ["Sparsifier", "SparsityStatus", "sparsify"]

_STATE_VERSION = 2  # 1: nmflow 0.1, whose MDGF recipes left their default decay unsaid (it ended at 70%)


@dataclass(frozen=True)
class SparsityStatus:
    """Where the schedule stands: what the next forward pass uses."""

    step: int
    phase: Phase
    decay: float | None  # D applied to pruned weights; None when masks are binary or absent
    by_layer: dict[str, str]  # "layer" or "layer[role]" -> "N:M" or "dense"
    by_key: dict[str, str]  # recipe key -> its current pattern(s), e.g. {"ff": "1:16"}; distinct ones comma-joined
    density: dict[str, float]  # recipe key -> fraction of its weights kept (N/M, weighted by size; 1.0 dense)

    @property
    def patterns(self) -> dict[str, str]:
        """`by_layer` under its nmflow 0.2 name."""
        return self.by_layer


def _saved_recipe(state: dict) -> Recipe:
    """The recipe a state ran with, its decay spelled out as version 2 does."""
    recipe = dict(state["recipe"])
    decay_unsaid = recipe.get("beta") is None and recipe.get("decay_end_fraction") is None
    if state["version"] == 1 and takes_decay(recipe.get("method")) and decay_unsaid:
        recipe["decay_end_fraction"] = 0.7
    return Recipe.from_dict(recipe)


def sparsify(model: nn.Module, recipe: Recipe, total_steps: int, *, verbose: bool = True) -> Sparsifier:
    """Attach ``recipe`` to ``model`` in place, for a run of ``total_steps`` optimizer steps.

    Every check runs before the model is touched: on any error the model is left as it was.
    Prints the table of the layers taken unless ``verbose=False`` (it is also `Sparsifier.table`).
    """
    return Sparsifier(model, recipe, total_steps, verbose=verbose)


class Sparsifier:
    """Owns the schedule of one model. Constructing it attaches the recipe (`sparsify` is the same call)."""

    def __init__(self, model: nn.Module, recipe: Recipe, total_steps: int, *, verbose: bool = True) -> None:
        if not isinstance(recipe, Recipe):
            raise ConfigError(f"sparsify needs an nmflow.Recipe, got {type(recipe).__name__}")
        self.model = model
        self.recipe = recipe
        self.schedule: RunSchedule = recipe.schedule(total_steps)  # plan, then validate, then attach
        self.targets = tuple(resolve_targets(model, recipe))
        self._step = 0
        self._finalized = False
        self._hooks: list = []
        if self.schedule.phase(0) is not Phase.DENSE:  # the first forward computes masks
            self._check_finite()
        self._attach()
        if verbose:
            print(self.table)

    # ----------------------------------------------------------------- schedule
    @property
    def step_count(self) -> int:
        """Number of `step()` calls so far: the schedule step of the next forward pass."""
        return self._step

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def plan(self) -> PhasePlan:
        return self.schedule.plan

    def decay_at(self, step: int) -> float | None:
        """D of the forward pass at schedule step ``step``; None when the masks are binary or absent."""
        return self.schedule.decay_at(step)

    def patterns_at(self, target: Target, step: int) -> tuple[NMPattern | None, ...]:
        """The pattern of each segment of ``target`` at schedule step ``step`` (None: dense)."""
        return tuple(self.schedule.pattern_at(seg.sequence, step) for seg in target.segments)

    def change_points(self) -> list[int]:
        """The steps at which the patterns, or whether the masks are soft (D > 0), may change; sorted, from 0."""
        return self.schedule.change_points(len(seg.sequence) for t in self.targets for seg in t.segments)

    def densities_at(self, step: int, *, by: str = "key") -> dict[str, float]:
        """Fraction of weights the patterns keep at ``step`` (N/M weighted by size; a soft MDGF mask counts N/M
        too), per recipe key (``by="key"``) or per sparsified module (``by="module"``)."""
        kept: dict[str, float] = {}
        sizes: dict[str, int] = {}
        for t in self.targets:
            per_row = self.trainable_weight(t).numel() // t.out_size  # shape only: no forward work
            for seg, pattern in zip(t.segments, self.patterns_at(t, step)):
                name = seg.key if by == "key" else t.name
                size = per_row * seg.rows
                kept[name] = kept.get(name, 0.0) + size * (1.0 if pattern is None else pattern.density)
                sizes[name] = sizes.get(name, 0) + size
            if by == "module":  # rows of a packed tensor that no recipe key claimed stay dense
                unclaimed = per_row * (t.out_size - sum(seg.rows for seg in t.segments))
                kept[t.name] += unclaimed
                sizes[t.name] += unclaimed
        return {name: kept[name] / sizes[name] for name in kept}

    def schedule_states(self) -> int:
        """How many distinct (patterns, soft masks) states the run passes through (one graph each under compile)."""
        return schedule_states(self.schedule, self.targets)

    def reschedule(self, total_steps: int) -> None:
        """Plan the run anew for ``total_steps``, before the first step.

        For integrations that must attach before they know the run's length: the HF Trainer wraps the model
        for DDP before training starts, and a weight parametrized after that wrapping is no longer synchronized.
        """
        if self._step != 0 or self._finalized:
            raise NmflowError(f"reschedule() only before the first step; {self._step} steps were taken")
        self.schedule = self.recipe.schedule(total_steps)
        self._apply_schedule()

    def status(self) -> SparsityStatus:
        step = self._step
        by_layer: dict[str, str] = {}
        by_key: dict[str, list[str]] = {}
        for t in self.targets:
            for seg, pattern in zip(t.segments, self.patterns_at(t, step)):
                text = "dense" if pattern is None else str(pattern)
                by_layer[_label(t, seg)] = text
                if text not in by_key.setdefault(seg.key, []):
                    by_key[seg.key].append(text)
        joined = {key: ",".join(texts) for key, texts in by_key.items()}
        density = self.densities_at(step, by="key")
        return SparsityStatus(step, self.schedule.phase(step), self.decay_at(step), by_layer, joined, density)

    def masks(self) -> dict[str, torch.Tensor]:
        """The boolean mask the next forward pass applies to each sparsified tensor (all True where nothing is
        pruned: while dense, under the ``dense`` method, after `finalize`). Costs one mask computation per tensor."""
        masks = {}
        with torch.no_grad():
            for t in self.targets:
                if self._is_attached(t):
                    masks[t.qualified_name] = self._parametrization(t).mask(self._original(t)).clone()
                else:
                    masks[t.qualified_name] = torch.ones_like(getattr(t.module, t.param_name), dtype=torch.bool)
        return masks

    def verify(self) -> list[dict]:
        """After `finalize`: check that every sparsified tensor holds exactly its target N:M.

        Returns one record per segment (layer, key, role, target, realized pattern, weights kept and total);
        raises `NmflowError` naming the layer if any group holds more than N non-zeros.
        """
        if not self._finalized:
            raise NmflowError("verify() checks the finalized weights; call finalize() first")
        records = []
        for t in self.targets if self.schedule.masked else ():
            weight = getattr(t.module, t.param_name).detach()
            for seg in t.segments:
                block = t.block(weight, seg)
                realized = realized_n(block, seg.target.m, t.block_in_dim)
                if realized > seg.target.n:
                    raise NmflowError(f"{_label(t, seg)} should be {seg.target} but a group holds {realized} non-zeros")
                kept, total = int(block.count_nonzero()), block.numel()
                records.append(
                    dict(
                        layer=_label(t, seg),
                        key=seg.key,
                        role=seg.role,
                        target=str(seg.target),
                        realized=f"{realized}:{seg.target.m}",
                        kept=kept,
                        total=total,
                    )
                )
        return records

    # ----------------------------------------------------------------- lifecycle
    def step(self) -> None:
        """Advance one optimizer step; call it right after ``optimizer.step()``."""
        if self._finalized:
            raise FinalizedError("step() called after finalize(); the model is no longer managed by nmflow")
        if self.schedule.phase(self._step + 1) is not Phase.DENSE:
            self._check_finite()
        self._step += 1
        self._apply_schedule()

    def finalize(self) -> nn.Module:
        """Write exact N:M zeros (target patterns) into the weights and remove the parametrizations."""
        if self._finalized:
            raise FinalizedError("finalize() was already called")
        if self.schedule.masked:
            if any(is_sharded(self._original(t)) for t in self.targets):
                raise ConfigError(
                    "finalize() cannot write into FSDP2-sharded weights; gather a full state dict and finalize an "
                    "unsharded copy (see docs/distributed.md)"
                )
            self._check_finite()
            with torch.no_grad():
                masks = [self._final_mask(t) for t in self.targets]
                for t, mask in zip(self.targets, masks):
                    parametrize.remove_parametrizations(t.module, t.param_name, leave_parametrized=False)
                    getattr(t.module, t.param_name).masked_fill_(~mask, 0.0)  # +0.0, not the -0.0 of w * 0
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._finalized = True
        return self.model

    def _final_mask(self, target: Target) -> torch.Tensor:
        param = self._parametrization(target)
        if param.fixed_mask is None:
            param.set_state(tuple(seg.target for seg in target.segments), None)
        return param.mask(self._original(target)).clone()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The step and any fixed masks (copies): all that resuming needs. Safe for ``weights_only`` loads."""
        fixed = {}
        if self.schedule.masked and not self._finalized:
            for t in self.targets:
                mask = self._parametrization(t).fixed_mask
                if mask is not None:
                    fixed[t.qualified_name] = mask.detach().clone().cpu()
        state = {
            "version": _STATE_VERSION,
            "step": self._step,
            "total_steps": self.total_steps,
            "recipe": self.recipe.to_dict(),
            "fixed_masks": fixed,
        }
        return {**state, "checksum": _checksum(state)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; checks it belongs to the same recipe and run length. Never mutates ``state``."""
        if self._finalized:
            raise FinalizedError("load_state_dict() called after finalize()")
        missing = {"version", "step", "total_steps", "recipe", "fixed_masks"} - set(state)
        if missing:
            raise ConfigError(f"sparsifier state lacks {sorted(missing)}; was it saved by Sparsifier.state_dict()?")
        if state["version"] not in (1, _STATE_VERSION):
            raise ConfigError(f"sparsifier state has version {state['version']}, this nmflow reads 1 and 2")
        if "checksum" in state and state["version"] == _STATE_VERSION and state["checksum"] != _checksum(state):
            raise ConfigError("sparsifier state is damaged: its checksum differs from the one state_dict() wrote")
        saved = _saved_recipe(state)
        if state["total_steps"] != self.total_steps or saved != self.recipe:
            raise ConfigError(
                "sparsifier state was saved for another run: "
                f"total_steps {state['total_steps']} vs {self.total_steps}, "
                f"recipe {saved.to_dict()} vs {self.recipe.to_dict()}"
            )
        step = state["step"]
        if not is_whole_number(step):
            raise ConfigError(f"sparsifier state has an invalid step {step!r}")
        by_name = {t.qualified_name: t for t in self.targets}
        unknown = set(state["fixed_masks"]) - set(by_name)
        if unknown:
            raise ConfigError(f"sparsifier state has masks for layers this model lacks: {sorted(unknown)}")
        for name, mask in state["fixed_masks"].items():
            expected = getattr(by_name[name].module, by_name[name].param_name).shape
            if tuple(mask.shape) != tuple(expected) or mask.dtype != torch.bool:
                raise ConfigError(
                    f"fixed mask for {name} has shape {tuple(mask.shape)}/{mask.dtype}, expected {tuple(expected)}/bool"
                )
        if self.schedule.masked:
            for t in self.targets:
                mask = state["fixed_masks"].get(t.qualified_name)
                param = self._parametrization(t)
                param.fixed_mask = None if mask is None else mask.to(param.decay.device, copy=True)
        self._step = step
        self._apply_schedule()

    # ----------------------------------------------------------------- attaching
    def _attach(self) -> None:
        if not self.schedule.masked:
            return
        for t in self.targets:
            param = NMParametrization(t, self.recipe.spec.gradient, self.recipe.srste_lambda)
            param.to(getattr(t.module, t.param_name).device)
            parametrize.register_parametrization(t.module, t.param_name, param)
            self._hooks.append(t.module.register_state_dict_post_hook(_keep_key(t.param_name)))
            self._hooks.append(t.module.register_load_state_dict_pre_hook(_restore_key(t.param_name)))
        self._apply_schedule()

    def _apply_schedule(self) -> None:
        if not self.schedule.masked:
            return
        decay = self.decay_at(self._step)
        freeze = self.recipe.spec.fixed_mask and self.schedule.phase(self._step) is not Phase.DENSE
        for t in self.targets:
            param = self._parametrization(t)
            param.set_state(self.patterns_at(t, self._step), decay)
            if freeze and param.fixed_mask is None:  # one-shot: prune once, at the end of the dense phase
                with torch.no_grad():  # from the whole weight: a shard's groups are not the model's (Conv1D)
                    param.fixed_mask = param.mask(_whole(self._original(t))).clone()

    def _check_finite(self) -> None:
        tensors = [self._original(t) if self._is_attached(t) else getattr(t.module, t.param_name) for t in self.targets]
        if not tensors:
            return
        local = [w.to_local() if is_sharded(w) else w for w in tensors]
        sharded = any(shard is not w for shard, w in zip(local, tensors))
        with torch.no_grad():
            # A finite sum proves every weight finite, at the cost of one reduction; only a non-finite sum
            # (a NaN/inf, or an overflow of large but finite weights) needs the exact check.
            finite = torch.stack([w.sum() for w in local]).isfinite()
            if not finite.all():
                finite = torch.stack([torch.isfinite(w).all() for w in local])
            if sharded:  # every rank sees only its shard: agree, so that all ranks stop together
                flags = finite.to(torch.int32)
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
                finite = flags.bool()
            finite = finite.cpu()
        if not finite.all():
            bad = [t.qualified_name for t, ok in zip(self.targets, finite.tolist()) if not ok]
            raise NonFiniteWeightError(f"NaN or inf in the weights of {', '.join(bad)}; no mask can be computed")

    def _is_attached(self, target: Target) -> bool:
        return parametrize.is_parametrized(target.module, target.param_name)

    def _parametrization(self, target: Target) -> NMParametrization:
        return getattr(target.module.parametrizations, target.param_name)[0]

    def _original(self, target: Target) -> torch.Tensor:
        return getattr(target.module.parametrizations, target.param_name).original

    # ----------------------------------------------------------------- reporting
    @property
    def table(self) -> str:
        """The layers taken: name, role, shape, rows, grouping dimension, target and pattern walk."""
        shapes = [tuple(self.trainable_weight(t).shape) for t in self.targets]
        return layer_table(self.recipe, self.schedule, self.targets, shapes)

    def trainable_weight(self, target: Target) -> torch.Tensor:
        """The parameter the optimizer updates for ``target`` (the unmasked weight while attached)."""
        return self._original(target) if self._is_attached(target) else getattr(target.module, target.param_name)

    def __repr__(self) -> str:
        method, targets = self.recipe.method, len(self.targets)
        return f"Sparsifier(method={method!r}, step={self._step}/{self.total_steps}, targets={targets})"


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded weight (a collective: every rank calls it at the same step)."""
    return weight.full_tensor() if is_sharded(weight) else weight


def _label(target: Target, segment: Segment) -> str:
    """How reports name a segment: the tensor, plus the role when the tensor is packed (GPT-2 c_attn[qk])."""
    return target.qualified_name if target.fully_covered else f"{target.qualified_name}[{segment.role}]"


def _keep_key(param_name: str):
    """State-dict post-hook: report ``parametrizations.<p>.original`` under its own name ``<p>``."""

    def hook(module, state_dict, prefix, local_metadata):
        key = f"{prefix}parametrizations.{param_name}.original"
        if key in state_dict:
            state_dict[f"{prefix}{param_name}"] = state_dict.pop(key)

    return hook


def _restore_key(param_name: str):
    """Load pre-hook: the inverse of `_keep_key`, so plain checkpoints load into a sparsified model."""

    def hook(module, state_dict, prefix, *args):
        key = f"{prefix}{param_name}"
        if key in state_dict and parametrize.is_parametrized(module, param_name):
            state_dict[f"{prefix}parametrizations.{param_name}.original"] = state_dict.pop(key)

    return hook
