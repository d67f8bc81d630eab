"""A re-creation of the official PGF code's N:M layer, used only as a speed and memory baseline.

It mirrors the approach of the paper's reference implementation (a timm fork), described rather
than copied:

* the mask: ``|W|`` detached, viewed as rows of M consecutive weights (the weight is transposed
  first when groups run along dim 0, the official "column" mode), an ``argsort`` of every row, and
  a float mask of ones with the M-N smallest positions scattered to zero;
* the layer: every forward recomputes that mask inside a custom autograd function that clones the
  weight, multiplies it by the float mask and keeps the float mask alive for the backward pass
  (4 bytes per weight, on top of the 4-byte masked weight that ``F.linear`` saves);
* the backward: identity (the official "step" decay, i.e. plain STE).

One deliberate difference: the official ``SparseLinear.forward`` drops the layer's bias. Here the
bias is kept, so that the comparison with dense and nmflow runs the same network. The official
function stores the mask as a ``ctx`` attribute; ``save_for_backward`` is used instead, which keeps
it alive exactly as long but lets ``torch.autograd.graph.saved_tensors_hooks`` see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def official_mask(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """Float32 mask (1 kept, 0 pruned) of a 2-D weight, by argsort over groups of ``m`` along ``dim``."""
    magnitude = weight.detach().abs()
    if dim == 0:
        magnitude = magnitude.t()
    groups = magnitude.reshape(-1, m)
    pruned = torch.argsort(groups, dim=1)[:, : m - n]
    mask = torch.ones(groups.shape, device=weight.device).scatter_(1, pruned, 0.0)
    mask = mask.reshape(magnitude.shape)
    return mask.t() if dim == 0 else mask


class _OfficialStepDecay(torch.autograd.Function):
    """Masked weight forward, identity backward; the float mask is kept for the backward pass."""

    @staticmethod
    def forward(ctx, weight, n, m):  # type: ignore[override]
        mask = official_mask(weight, n, m)
        ctx.save_for_backward(mask)
        return weight.clone() * mask  # the official code clones the weight before masking it

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


class OfficialSparseLinear(nn.Module):
    """Takes over an ``nn.Linear``'s own parameters (so the initialisation is unchanged)."""

    def __init__(self, linear: nn.Linear, n: int, m: int) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.n, self.m = n, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _OfficialStepDecay.apply(self.weight, self.n, self.m), self.bias)


def swap_linears(model: nn.Module, names: list[str], n: int, m: int) -> None:
    """Replace the named ``nn.Linear`` submodules of ``model`` by `OfficialSparseLinear`, in place."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, OfficialSparseLinear(getattr(parent, leaf), n, m))
