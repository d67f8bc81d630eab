"""Run a finalized model's 2:4-compatible weights on NVIDIA's sparse tensor cores, for inference.

Every group of 4 consecutive inputs of an N:M weight with N <= 2 and M a multiple of 4 (2:4, 1:4, 1:8, 2:16,
1:32, ...) holds at most 2 non-zeros, so the weight is 2:4-valid (3:8 need not be), and
`torch.sparse.to_sparse_semi_structured` can store it compressed for the CUTLASS / cuSPARSELt kernels (Ampere
and later). nmflow checks each weight's
actual zeros, not its recipe: whatever `Sparsifier.finalize` (or `load_compressed`) left exact qualifies.

    report = nmflow.semi_structured.plan(model)        # which layers qualify, and why the others do not
    nmflow.semi_structured.convert(model.half().cuda()) # swaps the qualifying weights in place

Only ``nn.Linear`` weights are converted: the kernels compute ``x @ W.T`` with the compressed operand grouped
along its rows' inputs, which is a Linear's layout. HF's ``Conv1D`` (GPT-2) stores ``W`` as [in, out] and
multiplies ``x @ W``; it is reported, not converted (replace those modules by ``nn.Linear`` first), and so are
3-D mixture-of-experts weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmflow.core.errors import ConfigError
from nmflow.core.layouts import expert_weights

__all__ = ["Candidate", "convert", "is_two_four_valid", "plan"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS, MIN_COLS = 32, 64  # both backends take fp16/bf16 shapes that are multiples of these (CUTLASS's limits)


@dataclass(frozen=True)
class Candidate:
    """One weight matrix of the model: whether it can be converted, and if not, why."""

    name: str
    shape: tuple[int, ...]
    convertible: bool
    reason: str  # "2:4-valid" or what stands in the way


def plan(model: nn.Module) -> list[Candidate]:
    """Every Linear (and Conv1D) weight with its verdict; reads the weights, changes nothing."""
    candidates = []
    for name, module in model.named_modules():
        candidates.extend(_expert_candidates(name, module))
        kind = type(module).__name__
        if not isinstance(module, nn.Linear) and kind != "Conv1D":
            continue
        weight = module.weight
        shape = tuple(weight.shape)
        if hasattr(module, "parametrizations"):
            reason = "still sparsified by nmflow: call finalize() first"
        elif kind == "Conv1D":
            reason = "HF Conv1D multiplies x @ W ([in, out]); the sparse kernels take nn.Linear layouts only"
        elif weight.dtype not in SUPPORTED_DTYPES:
            reason = f"dtype {weight.dtype}; convert the model to float16 or bfloat16 first"
        elif shape[0] % MIN_ROWS or shape[1] % MIN_COLS:
            reason = f"shape {shape}: rows must be a multiple of {MIN_ROWS} and inputs of {MIN_COLS}"
        elif not is_two_four_valid(weight):
            reason = "not 2:4-valid: some group of 4 inputs holds more than 2 non-zeros"
        else:
            reason = "2:4-valid"
        candidates.append(Candidate(name, shape, reason == "2:4-valid", reason))
    return candidates


@torch.no_grad()
def is_two_four_valid(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive entries along the last dimension."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.reshape(-1, 4) != 0).sum(dim=1).le(2).all())


def convert(model: nn.Module) -> list[Candidate]:
    """Swap every convertible Linear weight for its semi-structured sparse form, in place; returns the plan.

    Inference only: the converted weights do not train. Needs the model on a CUDA GPU; checks everything first.
    """
    from torch.sparse import to_sparse_semi_structured

    candidates = plan(model)
    devices = {c.name: model.get_submodule(c.name).weight.device for c in candidates if c.convertible}
    off_gpu = sorted(name for name, device in devices.items() if device.type != "cuda")
    if off_gpu:
        raise ConfigError(
            f"semi-structured sparse weights run on CUDA GPUs only; {', '.join(off_gpu[:3])} "
            f"{'are' if len(off_gpu) > 1 else 'is'} on {devices[off_gpu[0]]}: move the model with .cuda() first"
        )
    if not devices:
        raise ConfigError("no weight can be converted: " + _reasons(candidates))
    for candidate in candidates:
        if candidate.convertible:
            module = model.get_submodule(candidate.name)
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return candidates


def _expert_candidates(name: str, module: nn.Module) -> list[Candidate]:
    """3-D MoE expert weights: listed so that a plan accounts for every sparsified tensor, never converted."""
    reason = "3-D expert weight: the semi-structured kernels take 2-D nn.Linear weights only"
    return [
        Candidate(f"{name}.{param}", tuple(getattr(module, param).shape), False, reason)
        for param in expert_weights(name, module)
    ]


def _reasons(candidates: list[Candidate]) -> str:
    if not candidates:
        return "the model has no nn.Linear layer"
    return "; ".join(f"{c.name}: {c.reason}" for c in candidates[:4]) + ("; ..." if len(candidates) > 4 else "")
