"""Mask diagnostics: how much the masks changed (take them with `Sparsifier.masks`).

The flip rate, the fraction of mask entries that changed across one optimizer step, shows how settled
the pruning decision is: high while the magnitudes of kept and pruned weights still cross, near zero
once the pattern has converged (and exactly zero under a frozen one-shot mask).
"""

from __future__ import annotations

import torch

__all__ = ["flip_rate"]


def flip_rate(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of all mask entries, pooled over the tensors, that differ between ``before`` and ``after``."""
    if before.keys() != after.keys():
        raise ValueError(f"mask sets differ: {sorted(before.keys() ^ after.keys())}")
    if not before:
        return 0.0
    changed = sum(int((before[name] != after[name]).sum()) for name in before)
    total = sum(before[name].numel() for name in before)
    return changed / total
