"""Mask diagnostics: which weights the next forward pass keeps, and how much that changed.

The flip rate, the fraction of mask entries that changed across one optimizer step, shows how settled
the pruning decision is: high while the magnitudes of kept and pruned weights still cross, near zero
once the pattern has converged (and exactly zero under a frozen one-shot mask).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from nmflow.sparsifier import Sparsifier

__all__ = ["current_masks", "flip_rate", "key_density"]


def current_masks(sparsifier: Sparsifier) -> dict[str, torch.Tensor]:
    """The boolean mask the next forward pass applies to each sparsified tensor (all-True where nothing is pruned).

    Keyed by the tensor's qualified name. Tensors that carry no parametrization (the ``dense`` method,
    or after `Sparsifier.finalize`) are used as they are: all-True.
    """
    masks = {}
    with torch.no_grad():
        for target in sparsifier.targets:
            if parametrize.is_parametrized(target.module, target.param_name):
                plist = getattr(target.module.parametrizations, target.param_name)
                masks[target.qualified_name] = plist[0].mask(plist.original).clone()
            else:
                weight = getattr(target.module, target.param_name)
                masks[target.qualified_name] = torch.ones_like(weight, dtype=torch.bool)
    return masks


def flip_rate(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of all mask entries, pooled over the tensors, that differ between ``before`` and ``after``."""
    if before.keys() != after.keys():
        raise ValueError(f"mask sets differ: {sorted(before.keys() ^ after.keys())}")
    if not before:
        return 0.0
    changed = sum(int((before[name] != after[name]).sum()) for name in before)
    total = sum(before[name].numel() for name in before)
    return changed / total


def key_density(sparsifier: Sparsifier) -> dict[str, float]:
    """Recipe key -> fraction of its weights the current patterns keep (N/M; 1.0 while dense).

    Weighted by segment size, so a key whose layers sit on different patterns reports its overall density.
    """
    kept: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for target in sparsifier.targets:
        patterns = (None,) * len(target.segments)
        if parametrize.is_parametrized(target.module, target.param_name):
            patterns = getattr(target.module.parametrizations, target.param_name)[0].patterns
        shape = getattr(target.module, target.param_name).shape
        per_row = shape.numel() // shape[target.out_dim]
        for segment, pattern in zip(target.segments, patterns):
            size = per_row * (segment.stop - segment.start)
            density = 1.0 if pattern is None else pattern.n / pattern.m
            kept[segment.key] = kept.get(segment.key, 0.0) + density * size
            sizes[segment.key] = sizes.get(segment.key, 0) + size
    return {key: kept[key] / sizes[key] for key in kept}
