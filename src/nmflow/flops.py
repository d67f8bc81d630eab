"""FLOPs of a model's forward pass per layer, and of a sparse training run (paper App. D).

One multiply-add is 2 FLOPs. `count_inference_flops` runs one forward under
``torch.utils.flop_counter.FlopCounterMode`` and gives every module its *own* FLOPs (those not
run by a child module): the matmuls of a module that owns a weight form a ``"weight"`` row, whose
FLOPs scale with the fraction of weights kept; attention score/attend matmuls (``bmm``, SDPA) form an
``"attention"`` row of the module that ran them; anything else an ``"other"`` row. Two gaps of
FlopCounterMode are filled: the CPU kernel of ``scaled_dot_product_attention`` has no formula (it
would count 0), and the fused fast path of ``nn.MultiheadAttention`` runs uncounted ops, so it is
switched off while counting. A model on the ``meta`` device is counted without memory or compute.

Training (`training_flops`): each step costs, per example and row, ``dense * (s + s + g)``: the
forward and the input-gradient matmuls run at the density ``s`` the weight has at that step, the
weight-gradient matmul at ``g``. Rows that are not sparsified, attention included, have
``s = g = 1``. A sparsified row has ``s = 1`` while dense and while an MDGF mask is soft (pruned
weights still multiply, scaled by D), else ``s = N/M`` of its current pattern(s). ``g = 1`` for
every recipe whose gradient reaches pruned weights (straight-through: ste, srste, mdgf, sdgf) and
``g = s`` for ``oneshot`` (pruned weights get no gradient). The paper counts ``3 x`` the forward at
the current density instead, i.e. it takes the weight gradients of STE-style recipes as sparse too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from nmflow.core.errors import ConfigError, NmflowError, is_whole_number
from nmflow.core.recipes import GradientRule
from nmflow.core.sparsifier import Sparsifier

__all__ = [
    "FlopsCount",
    "LayerFlops",
    "count_inference_flops",
    "densities_at",
    "final_densities",
    "training_flops",
    "training_flops_until",
]

_ATTENTION_OPS = ("bmm", "baddbmm", "attention")  # substrings of aten op names: QK^T and AV, fused or not


@dataclass(frozen=True)
class LayerFlops:
    name: str  # module name as in model.named_modules() ("" for the model itself)
    kind: str  # "weight", "attention" or "other"
    dense: int  # FLOPs of the counted forward with every weight kept
    density: float = 1.0  # fraction of the weights kept; scales the FLOPs of a "weight" row


@dataclass(frozen=True)
class FlopsCount:
    layers: tuple[LayerFlops, ...]

    @property
    def dense_total(self) -> int:
        return sum(row.dense for row in self.layers)

    @property
    def total(self) -> float:
        return sum(row.dense * row.density for row in self.layers)

    def by_kind(self) -> dict[str, float]:
        """FLOPs at density per kind, e.g. {"weight": ..., "attention": ...}."""
        kinds: dict[str, float] = {}
        for row in self.layers:
            kinds[row.kind] = kinds.get(row.kind, 0.0) + row.dense * row.density
        return kinds

    def as_dict(self) -> dict:
        return {"dense_total": self.dense_total, "total": self.total, "layers": [asdict(r) for r in self.layers]}


def count_inference_flops(
    model: nn.Module, *args, densities: Mapping[str, float] | None = None, **kwargs
) -> FlopsCount:
    """FLOPs of one ``model(*args, **kwargs)`` per layer; ``densities`` maps module names to the fraction kept."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    grouped_mm = getattr(torch.ops.aten, "_grouped_mm", None)  # MoE experts in transformers 5
    mapping = {op: flops for op, flops in ((cpu_sdpa, _sdpa_flops), (grouped_mm, _grouped_mm_flops)) if op}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    out_proj = {}  # nn.MultiheadAttention runs its out_proj functionally: its FLOPs land on the parent
    hooks = [
        mha.register_forward_hook(_out_proj_recorder(out_proj))
        for mha in model.modules()
        if isinstance(mha, nn.MultiheadAttention)
    ]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for hook in hooks:
            hook.remove()
    rows = _rows(_own_counts(counter.get_flop_counts()), model, out_proj)
    return FlopsCount(tuple(_with_densities(rows, densities or {})))


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of the CPU SDPA kernel (shapes [batch, heads, seq, dim]; K/V may have fewer heads)."""
    batch, heads, seq_q, dim = query
    return 2 * batch * heads * seq_q * key[-2] * (dim + value[-1])


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """One matmul per expert: [tokens, in] x [experts, in, out] (or batched); the tokens add up to the rows."""
    flops = 2 * math.prod(out_shape) * a[-1]
    return flops // out_shape[0] if len(a) == len(b) == 2 else flops  # 2-D x 2-D: the groups split `in`


def _out_proj_recorder(out_proj: dict):
    def hook(mha: nn.MultiheadAttention, inputs, output) -> None:
        out_proj[mha] = out_proj.get(mha, 0) + 2 * output[0].numel() * mha.out_proj.in_features

    return hook


def _own_counts(counts: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Per module key, the FLOPs per op that no child module ran (FlopCounterMode counts them under every parent)."""
    own = {key: {str(op): flops for op, flops in ops.items()} for key, ops in counts.items()}
    for key, ops in counts.items():
        if key == "Global":
            continue
        parts = key.split(".")
        parent = next((p for i in range(len(parts) - 1, 0, -1) if (p := ".".join(parts[:i])) in counts), "Global")
        for op, flops in ops.items():
            own[parent][str(op)] -= flops
    if any(flops < 0 for ops in own.values() for flops in ops.values()):
        raise NmflowError("a module ran outside its parent's forward (a shared module?); FLOPs cannot be attributed")
    return own


def _rows(own: dict[str, dict[str, int]], model: nn.Module, out_proj: dict) -> list[LayerFlops]:
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    root = type(model).__name__
    rows = []
    for key, ops in own.items():
        name = "" if key in (root, "Global") else key.removeprefix(root + ".")
        module = modules.get(name)
        attention = sum(f for op, f in ops.items() if any(a in op for a in _ATTENTION_OPS))
        rest = sum(ops.values()) - attention
        owns_weight = module is not None and (
            parametrize.is_parametrized(module) or any(p.ndim >= 2 for p in module.parameters(recurse=False))
        )
        if module in out_proj and rest:
            rows.append(LayerFlops(f"{name}.out_proj", "weight", out_proj[module]))
            rest -= out_proj[module]
        for kind, flops in (("weight" if owns_weight else "other", rest), ("attention", attention)):
            if flops:
                rows.append(LayerFlops(name, kind, flops))
    return sorted(rows, key=lambda row: (order.get(row.name, len(order)), row.kind))


def _with_densities(rows: list[LayerFlops], densities: Mapping[str, float]) -> list[LayerFlops]:
    weight_rows = {row.name for row in rows if row.kind == "weight"}
    for name, density in densities.items():
        if name not in weight_rows:
            raise ConfigError(f"densities name {name!r}, which ran no weight matmul in this forward")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"density of {name!r} must be within (0, 1], got {density!r}")
    return [
        LayerFlops(r.name, r.kind, r.dense, float(densities.get(r.name, 1.0)) if r.kind == "weight" else 1.0)
        for r in rows
    ]


def densities_at(sp: Sparsifier, step: int) -> dict[str, float]:
    """Fraction of weights the patterns keep at ``step``, per sparsified module (a soft MDGF mask counts N/M too)."""
    return sp.densities_at(step, by="module")


def final_densities(sp: Sparsifier) -> dict[str, float]:
    """Densities of the finished run (the target patterns; 1.0 everywhere under the ``dense`` method)."""
    return densities_at(sp, sp.total_steps)


def training_flops(sp: Sparsifier, per_example: FlopsCount, examples_per_step: int) -> int:
    """FLOPs of the whole run of ``sp.total_steps`` steps; ``per_example`` is one example's dense forward."""
    return training_flops_until(sp, per_example, examples_per_step, sp.total_steps)


def training_flops_until(sp: Sparsifier, per_example: FlopsCount, examples_per_step: int, step: int) -> int:
    """FLOPs of steps ``0 .. step - 1`` (accounting in the module docstring); costs one evaluation per change."""
    if not is_whole_number(examples_per_step, minimum=1):
        raise ConfigError(f"examples_per_step must be a whole number >= 1, got {examples_per_step!r}")
    if not is_whole_number(step):
        raise ConfigError(f"step must be a whole number >= 0, got {step!r}")
    weight_rows = {row.name: row.dense for row in per_example.layers if row.kind == "weight"}
    missing = sorted({t.name for t in sp.targets} - set(weight_rows))
    if missing:
        raise ConfigError(f"per_example has no weight row for the sparsified modules {missing}; count the same model")
    fixed = 3 * (per_example.dense_total - sum(weight_rows[name] for name in {t.name for t in sp.targets}))
    bounds = sorted({0, step} | {b for b in sp.change_points() if b < step})
    sparse_weight_gradient = sp.recipe.spec.gradient is GradientRule.FROZEN  # pruned weights get no gradient
    total = 0
    for start, stop in zip(bounds, bounds[1:]):
        soft = sp.schedule.soft(start)
        per_step = fixed
        for name, density in densities_at(sp, start).items():
            s = 1.0 if soft else density
            per_step += weight_rows[name] * (2 * s + (s if sparse_weight_gradient else 1.0))
        total += (stop - start) * per_step
    return round(total * examples_per_step)
