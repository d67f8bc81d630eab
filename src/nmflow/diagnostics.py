"""Training diagnostics of the sparsified weights: the gradient noise and mask stability the paper studies (§4).

Per recipe key (``ff``, ``qk``, ...), read around one optimizer step:

* ``grad_abs_var``: Var(|dL/dW|) over the elements of each tensor, averaged over the key's tensors: the paper's
  gradient-noise measure (Fig. 3b). The gradient is the one the optimizer receives (after SR-STE's term).
* ``exp_avg_sq_var`` / ``exp_avg_sq_norm``: the variance and the L2 norm of Adam's second moment ``exp_avg_sq``
  of those weights, averaged over tensors (Fig. 3a plots one of the two; the paper does not say which).
* ``flip_rate``: the fraction of mask entries that differ between this step's forward pass and the next one's.

Everything is a few reductions over tensors the step computes anyway, plus one mask computation per logged step
(two when steps are not logged back to back): cheap enough to leave on.

    diag = StepDiagnostics(sp, optimizer)
    loss.backward(); diag.after_backward()
    optimizer.step(); sp.step(); record = diag.after_step()   # {"grad_abs_var": {"ff": ...}, ...}
"""

from __future__ import annotations

import torch

from nmflow.core.sparsifier import Sparsifier

__all__ = ["StepDiagnostics", "flip_rate"]


def flip_rate(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of all mask entries, pooled over the tensors, that differ between ``before`` and ``after``."""
    if before.keys() != after.keys():
        raise ValueError(f"mask sets differ: {sorted(before.keys() ^ after.keys())}")
    if not before:
        return 0.0
    changed = sum(int((before[name] != after[name]).sum()) for name in before)
    total = sum(before[name].numel() for name in before)
    return changed / total


class StepDiagnostics:
    """Reads the statistics of one optimizer step; call `after_backward`, then `after_step` after ``sp.step()``."""

    def __init__(self, sparsifier: Sparsifier, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.sparsifier = sparsifier
        self.optimizer = optimizer
        # (key, target, segment) for every sparsified segment
        self._pieces = [(seg.key, t, seg) for t in sparsifier.targets for seg in t.segments]
        self._grad: dict[str, float] = {}
        self._masks: dict[str, torch.Tensor] | None = None
        self._masks_step = -1

    def _by_key(self, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The segments of ``tensors`` (named like the targets) grouped by recipe key."""
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for key, t, seg in self._pieces:
            tensor = tensors.get(t.qualified_name)
            if tensor is not None:
                label = f"{t.qualified_name}[{seg.start}:{seg.stop}/{seg.groups}]"
                pieces.setdefault(key, {})[label] = t.block(tensor, seg)
        return pieces

    def _weights(self) -> dict[str, torch.Tensor]:
        return {t.qualified_name: self.sparsifier.trainable_weight(t) for t in self.sparsifier.targets}

    @torch.no_grad()
    def after_backward(self) -> None:
        """Record the gradients, and the masks of the forward pass that produced them."""
        grads = {name: w.grad for name, w in self._weights().items() if w.grad is not None}
        self._grad = {
            key: _mean(g.abs().float().var() for g in parts.values()) for key, parts in self._by_key(grads).items()
        }
        step = self.sparsifier.step_count
        if self._masks_step != step:
            self._masks, self._masks_step = self.sparsifier.masks(), step

    @torch.no_grad()
    def after_step(self) -> dict[str, dict[str, float]]:
        """The record of the step: the statistics above, per recipe key."""
        if self._masks is None:
            raise RuntimeError("after_step() needs after_backward() first, in the same step")
        before = self._by_key(self._masks)
        self._masks, self._masks_step = self.sparsifier.masks(), self.sparsifier.step_count
        after = self._by_key(self._masks)
        record: dict[str, dict[str, float]] = {
            "grad_abs_var": self._grad,
            "flip_rate": {key: flip_rate(before[key], after[key]) for key in before},
        }
        if self.optimizer is not None:
            moments = {}
            for name, w in self._weights().items():
                state = self.optimizer.state.get(w, {})
                if "exp_avg_sq" in state:
                    moments[name] = state["exp_avg_sq"]
            by_key = self._by_key(moments)
            record["exp_avg_sq_var"] = {
                key: _mean(v.float().var() for v in parts.values()) for key, parts in by_key.items()
            }
            record["exp_avg_sq_norm"] = {
                key: _mean(torch.linalg.vector_norm(v.float()) for v in parts.values()) for key, parts in by_key.items()
            }
        self._grad = {}
        return record


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)
