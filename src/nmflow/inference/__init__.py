"""Fast N:M inference: ``deploy`` swaps every exactly-N:M ``nn.Linear`` / HF ``Conv1D`` for an :class:`NMLinear`.

    table = nmflow.deploy(model)          # in place; prints and returns the per-layer table
    nmflow.deploy(model, checkpoint="model-nm.safetensors")  # straight from a compressed file, never dense
    nmflow.undeploy(model)                 # plain dense modules again, bitwise

Modules: :mod:`~nmflow.inference.nmlinear` (the layer), :mod:`~nmflow.inference.backends` (how it computes, and the
registry), :mod:`~nmflow.inference.dispatch` (``auto``), :mod:`~nmflow.inference.kernel` (the C++ kernel).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmflow.core.errors import ConfigError
from nmflow.inference import dispatch, kernel
from nmflow.inference.backends import BACKENDS, Backend, register_backend
from nmflow.inference.nmlinear import NMLinear, is_conv1d
from nmflow.inference.plan import Planned, plan_from_checkpoint, plan_from_weights, retie

__all__ = ["BACKENDS", "Backend", "DeployedLayer", "NMLinear", "deploy", "format_table", "register_backend", "undeploy"]

_warned = False


@dataclass(frozen=True)
class DeployedLayer:
    """One row of deploy's table."""

    name: str
    pattern: str
    backend: str
    bytes_before: int
    bytes_after: int


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """The modules deploy may swap: exact ``nn.Linear`` (not subclasses such as MultiheadAttention's
    ``out_proj``, whose weight the parent reads directly) and HF ``Conv1D``."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise ConfigError(
                f"{name or 'the model'} is still sparsified by nmflow (parametrized): call finalize() first"
            )
        if type(module) is nn.Linear or is_conv1d(module):
            if not name:
                raise ConfigError("deploy swaps layers inside a model; wrap a lone layer in a module first")
            found[name] = module
    return found


def _check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    if backend in ("auto", "nm") and not kernel.available():
        if backend == "nm":
            raise ConfigError(
                f"backend 'nm' needs nmflow's N:M kernel, which is unavailable: {kernel.unavailable_reason()}"
            )
        global _warned
        if not _warned:
            warnings.warn(
                f"nmflow.deploy: the N:M kernel is unavailable ({kernel.unavailable_reason()}); N:M layers run "
                "torch's CSR matmul in float32 and keep a dense copy in other dtypes (no speed-up there)",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned = True


def deploy(
    model: nn.Module,
    *,
    backend: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    layers: list[str] | None = None,
    dense_copies: bool = False,
    verbose: bool = True,
) -> list[DeployedLayer]:
    """Swap every ``nn.Linear`` / ``Conv1D`` whose weight is exact N:M along its input for an ``NMLinear``.

    The pattern of each weight is found as ``save_compressed`` finds it (the cheapest exact N:M, see
    :func:`nmflow.compressed.choose_pattern`); other layers stay as they are, unless ``layers`` names them, which
    makes a layer that is not N:M an error. With ``checkpoint`` (a file of ``save_compressed``), the whole state
    is loaded from it and its compressed weights go straight into the N:M layers, never dense; the model may live
    on the ``meta`` device. Everything is checked before the model changes: a bad input raises
    ``nmflow.ConfigError`` and leaves the model as it was. ``dense_copies=True`` lets ``auto`` keep a layer's
    dense weight where dense GEMM on it is fastest (see :mod:`nmflow.inference.dispatch`); by default a deployed
    model holds only its compressed bytes. Returns the per-layer table (printed if ``verbose``).
    """
    _check_backend(backend)
    modules = _candidates(model)
    if layers is not None:
        unknown = sorted(set(layers) - set(modules))
        if unknown:
            raise ConfigError(f"layers names {unknown[:3]}, which are not nn.Linear/Conv1D layers of the model")
    if checkpoint is None:
        planned, loaded, ties = plan_from_weights(modules, layers), {}, []
    else:
        planned, loaded, ties = plan_from_checkpoint(model, modules, checkpoint)
    if layers is not None:
        dense = sorted(set(layers) - {p.name for p in planned})
        if dense:
            raise ConfigError(f"{dense[0]}.weight is not N:M along its input dimension (not exact)")
    if not planned:
        if any(isinstance(module, NMLinear) for module in model.modules()):
            raise ConfigError("the model is deployed already (it has NMLinear layers and no other N:M layer)")
        raise ConfigError("no nn.Linear/Conv1D weight of the model is N:M; finalize() a sparsified model first")

    if loaded:
        model.load_state_dict(loaded, strict=False, assign=True)  # a tie's first key only: see retie
        retie(model, ties)
    table = [_swap(model, plan, backend, dense_copies) for plan in planned]
    if verbose:
        print(format_table(table))
    return table


def _swap(model: nn.Module, plan: Planned, backend: str, dense_copies: bool) -> DeployedLayer:
    parent_name, _, child = plan.name.rpartition(".")
    layer = NMLinear(
        plan.parts, plan.info, plan.bias, source=plan.source, requires_grad=plan.requires_grad, backend=backend
    )
    layer.dense_copies = dense_copies
    setattr(model.get_submodule(parent_name), child, layer)
    shown = backend
    if backend == "auto" and layer.values.device.type != "meta":
        probe = torch.zeros(1, layer.in_features, dtype=layer.values.dtype, device=layer.values.device)
        shown = f"auto ({dispatch.backend_for(layer, probe).name} at batch 1)"
    return DeployedLayer(plan.name, f"{layer.n}:{layer.m}", shown, plan.bytes_before, layer.nbytes())


def undeploy(model: nn.Module) -> int:
    """Turn every ``NMLinear`` back into the dense module it came from (bitwise); returns how many."""
    swapped = [(name, module) for name, module in model.named_modules() if isinstance(module, NMLinear)]
    for name, module in swapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.to_dense_module())
    return len(swapped)


def format_table(table: list[DeployedLayer]) -> str:
    """The table as text, with totals."""
    width = max([len("layer"), *(len(row.name) for row in table)])
    lines = [f"{'layer':<{width}}  pattern  {'backend':<26} {'bytes before':>14} {'bytes after':>13}"]
    for row in table:
        lines.append(
            f"{row.name:<{width}}  {row.pattern:<7}  {row.backend:<26} {row.bytes_before:>14,} {row.bytes_after:>13,}"
        )
    before, after = sum(r.bytes_before for r in table), sum(r.bytes_after for r in table)
    lines.append(f"{len(table)} layers deployed: {before:,} -> {after:,} bytes ({after / max(before, 1):.1%})")
    return "\n".join(lines)
