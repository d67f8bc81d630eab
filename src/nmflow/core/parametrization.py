"""The forward/backward of a sparsified weight, attached with `torch.nn.utils.parametrize`.

``W_eff = W * (mask + D * (1 - mask))`` in the forward pass. The backward is straight-through:
W receives W_eff's gradient unchanged (paper §3: "we intentionally refrain from modifying the
gradient update rules"), with two exceptions: SR-STE adds ``lambda * (1 - mask) * W``, and a
frozen (one-shot) mask gives pruned weights no gradient.

Memory: the forward keeps W_eff (one copy of the weight); the backward saves nothing for the
straight-through rule and the 1-byte boolean mask for the other two.
"""

from __future__ import annotations

import torch
from torch import nn

from nmflow.core.masks import NMPattern, compute_mask
from nmflow.core.recipes import GradientRule
from nmflow.core.targets import Target

__all__ = ["NMParametrization"]


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask, decay, rule: GradientRule, srste_lambda: float):  # type: ignore[override]
        ctx.rule, ctx.srste_lambda = rule, srste_lambda
        if rule is GradientRule.SRSTE:
            ctx.save_for_backward(weight, mask)
        elif rule is GradientRule.FROZEN:
            ctx.save_for_backward(mask)
        if decay is None:  # binary
            return weight * mask
        return torch.where(mask, weight, weight * decay)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.rule is GradientRule.SRSTE:
            weight, mask = ctx.saved_tensors
            grad = torch.where(mask, grad, grad + ctx.srste_lambda * weight)
        elif ctx.rule is GradientRule.FROZEN:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None


class NMParametrization(nn.Module):
    """Turns one dense tensor into its effective weight under the current schedule state.

    The sparsifier sets the state (`set_state`) after every optimizer step; in between, every
    forward recomputes the mask from the current weights, as the paper does. The state lives in
    plain attributes and non-persistent buffers, so the model's ``state_dict`` is unchanged.
    """

    def __init__(self, target: Target, rule: GradientRule, srste_lambda: float) -> None:
        super().__init__()
        self.target = target
        self.segments = target.segments
        self.in_dim = target.in_dim
        self.rule, self.srste_lambda = rule, srste_lambda
        self._covers_all = target.fully_covered
        self.patterns: tuple[NMPattern | None, ...] = (None,) * len(self.segments)  # None: dense
        self.decaying = False  # True: D in (0, 1) applies to pruned weights; False: binary
        self.register_buffer("decay", torch.ones(()), persistent=False)
        self.register_buffer("fixed_mask", None, persistent=False)

    @property
    def active(self) -> bool:
        return any(p is not None for p in self.patterns)

    def set_state(self, patterns: tuple[NMPattern | None, ...], decay: float | None) -> None:
        self.patterns = patterns
        self.decaying = decay is not None and decay > 0.0
        if self.decaying:
            self.decay.fill_(decay)

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The boolean mask under the current patterns (or the frozen one)."""
        if self.fixed_mask is not None:
            return self.fixed_mask
        if self._covers_all and self.patterns[0] is not None:
            return compute_mask(weight, self.patterns[0], self.in_dim)
        mask = torch.ones_like(weight, dtype=torch.bool)
        for seg, pattern in zip(self.segments, self.patterns):
            if pattern is not None:
                block = self.target.block(weight, seg)
                self.target.block(mask, seg).copy_(compute_mask(block, pattern, self.target.block_in_dim))
        return mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return weight
        decay = self.decay if self.decaying else None
        return _MaskedWeight.apply(weight, self.mask(weight), decay, self.rule, self.srste_lambda)
