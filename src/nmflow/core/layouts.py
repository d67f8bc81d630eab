"""Where a weight's input dimension is, and which output rows of a packed projection belong to which role.

Two questions every consumer of a sparsified tensor asks:

* `weight_layout`: along which dimension do the groups of M run (the input), and which one holds the
  output rows? Linear ``[out, in]``, transformers' Conv1D ``[in, out]``, 3-D expert weights
  ``[experts, out, in]`` (or ``[experts, in, out]`` where the module says ``is_transposed``).
* `packed_layout`: in a packed Q/K/V projection, which rows are Q, K and V? Worked out from the model's
  config (heads, kv heads, multi-query) for the families whose code we read, never guessed: a layout that
  cannot be established is None, and the resolver refuses a sub-role of such a tensor.

A `Layout` is ``groups`` repeats of one period of rows, each period split into role blocks, which covers
contiguous [Q | K | V] (one group, GQA sizes included), per-head interleaving (NeoX, BLOOM: one group per head)
and per-kv-group packing (Falcon's new architecture).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmflow.core.roles import EXPERT_MODULE

__all__ = ["Layout", "block_rows", "expert_weights", "packed_layout", "weight_input_dims", "weight_layout"]

_EXPERT_MODULE = re.compile(rf"(?:^|\.){EXPERT_MODULE}$")


@dataclass(frozen=True)
class Layout:
    """Output rows of a tensor: ``groups`` repeats of a period split into ``(role, start, stop)`` blocks."""

    groups: int
    blocks: tuple[tuple[str, int, int], ...]  # sorted by start, contiguous from 0 to the period

    @property
    def period(self) -> int:
        return self.blocks[-1][2]

    @classmethod
    def split(cls, roles_and_sizes: list[tuple[str, int]], groups: int = 1) -> Layout:
        blocks, start = [], 0
        for role, size in roles_and_sizes:
            blocks.append((role, start, start + size))
            start += size
        return cls(groups, tuple(blocks))


def weight_layout(module: nn.Module, param_name: str = "weight") -> tuple[int, int] | None:
    """(input dim, output dim) of ``getattr(module, param_name)``, or None when nmflow cannot tell.

    ``param_name`` other than ``weight``: a 3-D expert weight (see `expert_weights`).
    """
    if param_name != "weight":
        return _expert_layout(module)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' Conv1D: [in, out]
        return 0, 1
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # [in, out / groups, *kernel]
        return 0, 1
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
        return 1, 0
    return None


def expert_weights(name: str, module: nn.Module) -> list[str]:
    """The 3-D expert weights of ``module`` when its name marks it as a set of experts (``mlp.experts``)."""
    if not _EXPERT_MODULE.search(name):
        return []
    names = [p for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
    if parametrize.is_parametrized(module):  # sparsified already: still listed, so a second attempt is named
        names += [p for p in module.parametrizations if getattr(module, p).dim() == 3]
    return names


def weight_input_dims(model: nn.Module) -> dict[str, int]:
    """State-dict key -> input dim for every weight whose layout nmflow knows (for the compressed format)."""
    dims = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            for param in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, param, None) is not None:
                    dims[prefix + param] = 1
            continue
        params = expert_weights(name, module)
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            params.append("weight")
        for param in params:
            layout = weight_layout(module, param)
            if layout is not None:
                dims[prefix + param] = layout[0]
    return dims


def _expert_layout(module: nn.Module) -> tuple[int, int] | None:
    """[experts, out, in], or [experts, in, out] when transposed; None for a module that does not say."""
    if not hasattr(module, "is_transposed"):
        return None
    return (1, 2) if module.is_transposed else (2, 1)


def block_rows(tensor: torch.Tensor, out_dim: int, groups: int, start: int, stop: int) -> torch.Tensor:
    """A view of rows ``[start, stop)`` of every one of ``groups`` periods along ``out_dim``.

    The view has one more dimension than ``tensor`` (the group), inserted at ``out_dim``; an input dim after
    ``out_dim`` moves one place right (see `Target.block_in_dim`).
    """
    period = tensor.shape[out_dim] // groups
    return tensor.unflatten(out_dim, (groups, period)).narrow(out_dim + 1, start, stop - start)


# ------------------------------------------------------------------ packed Q/K/V layouts from the config
def _thirds(out: int, config: Any) -> Layout | None:
    return Layout.split([("q", out // 3), ("k", out // 3), ("v", out // 3)]) if out % 3 == 0 else None


def _per_head(heads: int, roles: tuple[str, ...], out: int) -> Layout | None:
    """[heads, len(roles), head_dim]: each head's rows for every role in turn (NeoX, BLOOM)."""
    if out % (heads * len(roles)):
        return None
    head_dim = out // (heads * len(roles))
    return Layout.split([(role, head_dim) for role in roles], groups=heads)


def _c_attn(out: int, config: Any) -> Layout | None:
    if config is None or config.model_type == "gpt2":  # GPT-2 (Conv1D) and nanoGPT (Linear): [Q | K | V]
        return _thirds(out, config)
    if config.model_type != "gpt_bigcode":
        return None
    heads, hidden = config.num_attention_heads, config.hidden_size
    if not config.multi_query:
        return _per_head(heads, ("q", "k", "v"), out)
    head_dim = hidden // heads  # multi-query: [Q | one K head | one V head]
    return Layout.split([("q", hidden), ("k", head_dim), ("v", head_dim)])


def _c_attn_cross(out: int, config: Any) -> Layout | None:
    if (config is None or config.model_type == "gpt2") and out % 2 == 0:
        return Layout.split([("k", out // 2), ("v", out // 2)])
    return None  # GPTBigCode's cross-attention splits by one head's size: no layout to trust


def _qkv(out: int, config: Any) -> Layout | None:
    return _thirds(out, config) if config is None else None  # timm's blocks carry no HF config


def _query_key_value(out: int, config: Any) -> Layout | None:
    if config is None:
        return None
    heads = config.num_attention_heads
    if config.model_type in ("gpt_neox", "bloom"):
        return _per_head(heads, ("q", "k", "v"), out)
    if config.model_type != "falcon":
        return None
    head_dim = config.hidden_size // heads
    if config.new_decoder_architecture:  # [kv heads, queries of the group + K + V, head_dim]
        kv = config.num_kv_heads
        return Layout.split([("q", heads // kv * head_dim), ("k", head_dim), ("v", head_dim)], groups=kv)
    if config.multi_query:  # [Q | one K head | one V head]
        return Layout.split([("q", heads * head_dim), ("k", head_dim), ("v", head_dim)])
    return _per_head(heads, ("q", "k", "v"), out)


def _qkv_proj(out: int, config: Any) -> Layout | None:
    if config is None:
        return None
    heads = config.num_attention_heads
    if config.model_type == "phi3":  # [Q | K | V], K and V with the kv heads
        kv = config.num_key_value_heads
        if out % (heads + 2 * kv):
            return None
        head_dim = out // (heads + 2 * kv)
        return Layout.split([("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)])
    if config.model_type == "codegen":  # 4 model-parallel groups of [Q | V | K], fixed in CodeGen's code
        return _per_head(4, ("q", "v", "k"), out)
    return None


def _wqkv(out: int, config: Any) -> Layout | None:
    return _thirds(out, config) if config is not None and config.model_type in ("mpt", "modernbert") else None


def _mha(out: int, config: Any) -> Layout | None:
    return _thirds(out, config)  # torch's in_proj_weight is [Q | K | V] by definition


_PACKED: dict[str, Callable[[int, Any], Layout | None]] = {
    "c_attn": _c_attn,
    "c_attn_cross": _c_attn_cross,
    "qkv": _qkv,
    "query_key_value": _query_key_value,
    "qkv_proj": _qkv_proj,
    "Wqkv": _wqkv,
    "in_proj_weight": _mha,
}


def packed_layout(kind: str, out: int, config: Any) -> Layout | None:
    """The layout of a packed projection of ``out`` rows (``kind`` from `ROLE_RULES`), or None if unknown.

    ``config`` is the model's HF config (None for plain torch models); a layout whose sizes do not add up to
    ``out`` is unknown too.
    """
    try:
        layout = _PACKED[kind](out, config)
    except (AttributeError, TypeError, ZeroDivisionError):  # a config without the fields the layout reads
        return None
    if layout is None or layout.groups * layout.period != out or any(a == b for _, a, b in layout.blocks):
        return None
    return layout
