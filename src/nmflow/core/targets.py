"""Which tensors of a model a recipe sparsifies: roles found by name, layouts found by module type.

Roles are recognised without configuration on HF ViT, BERT, GPT-2, T5 and LLaMA-style models,
``torch.nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` and timm-style blocks, from the
table `ROLE_RULES` below. Anything else is reached with ``re:<regex>`` on full module names.
Resolution only *plans*: it reads the model and changes nothing, so a bad recipe fails before any
layer is touched.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmflow.core.errors import ConfigError, NoMatchingTargetError
from nmflow.core.masks import NMPattern
from nmflow.core.recipes import Recipe
from nmflow.core.schedules import geometric_patterns, stepwise_patterns

__all__ = ["ROLE_RULES", "Segment", "Target", "resolve_targets"]

_ATTN = r"[A-Za-z_]*(?:attn|attention|Attention)[A-Za-z_]*"
_ATTN_SCOPE = rf"{_ATTN}(?:\.self|\.attention)?"

ROLE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # (regex searched at the end of the full module name, roles of its output blocks in order)
    (r"attention\.output\.dense", ("attn_out",)),  # BERT (before the FF rule for `output.dense`)
    (rf"{_ATTN}\.(?:o_proj|o|out_proj|proj|c_proj)", ("attn_out",)),  # ViT, LLaMA, T5, torch, timm, GPT-2
    (rf"{_ATTN_SCOPE}\.(?:q_proj|q|query|q_attn)", ("q",)),
    (rf"{_ATTN_SCOPE}\.(?:k_proj|k|key)", ("k",)),
    (rf"{_ATTN_SCOPE}\.(?:v_proj|v|value)", ("v",)),
    (r"crossattention\.c_attn", ("k", "v")),  # GPT-2 cross-attention: K and V packed in one Conv1D
    (r"attn\.c_attn", ("q", "k", "v")),  # GPT-2: Q, K, V packed as column blocks of a Conv1D
    (r"attn\.qkv", ("q", "k", "v")),  # timm: Q, K, V packed as row blocks of a Linear
    (r"(?:intermediate|output)\.dense", ("ff",)),  # BERT
    (r"mlp\.(?:fc1|fc2|c_fc|c_proj|gate_proj|up_proj|down_proj)", ("ff",)),  # ViT, timm, GPT-2, LLaMA
    (r"DenseReluDense\.(?:wi|wi_0|wi_1|wo)", ("ff",)),  # T5
)
_COMPILED_RULES = tuple((re.compile(rf"(?:^|\.){pattern}$"), roles) for pattern, roles in ROLE_RULES)
_ROLE_GROUPS = {"qk": ("q", "k"), "qkv": ("q", "k", "v")}


@dataclass(frozen=True)
class Segment:
    """Output rows/columns ``[start, stop)`` of one tensor, sparsified under one recipe key."""

    key: str  # the recipe key that claimed it: "ff", "qk", "re:..."
    role: str  # what it is: "ff", "q", ..., or "-" for a layer of no known role (reached by regex)
    start: int
    stop: int
    target: NMPattern
    sequence: tuple[NMPattern, ...]  # patterns walked over the sparse window; ends at target


@dataclass(frozen=True)
class Target:
    """One sparsified tensor: ``getattr(module, param_name)`` grouped along ``in_dim``."""

    name: str  # module name in the model
    module: nn.Module
    param_name: str
    in_dim: int  # groups of M run along this dimension
    out_dim: int  # packed Q/K/V blocks split along this one
    out_size: int  # size of out_dim
    segments: tuple[Segment, ...]

    @property
    def fully_covered(self) -> bool:
        """One segment over the whole tensor (the common case, and the fast path of the mask)."""
        return len(self.segments) == 1 and self.segments[0].start == 0 and self.segments[0].stop == self.out_size

    @property
    def qualified_name(self) -> str:
        return self.name if self.param_name == "weight" else f"{self.name}.{self.param_name}"

    @property
    def group_size(self) -> int:
        return getattr(self.module, self.param_name).shape[self.in_dim]


@dataclass(frozen=True)
class _Slot:
    """A tensor that could be sparsified, before the recipe is consulted."""

    name: str
    module: nn.Module
    param_name: str
    in_dim: int
    out_dim: int
    block_roles: tuple[str, ...] | None  # None: no role known, reachable by regex only


def _layout(module: nn.Module) -> tuple[int, int] | None:
    """(input dim, output dim) of ``module.weight``, or None for unsupported modules."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' Conv1D: [in, out]
        return 0, 1
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # [in, out / groups, *kernel]
        return 0, 1
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
        return 1, 0
    return None


def _detect_roles(name: str, module: nn.Module, parent: nn.Module | None) -> tuple[str, ...] | None:
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and leaf in ("linear1", "linear2"):
        return ("ff",)
    if isinstance(module, nn.Embedding):
        return None
    for pattern, roles in _COMPILED_RULES:
        if pattern.search(name):
            return roles
    return None


def _slots(model: nn.Module) -> Iterator[_Slot]:
    parents: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            if module._qkv_same_embed_dim:
                yield _Slot(name, module, "in_proj_weight", 1, 0, ("q", "k", "v"))
            else:
                for role in ("q", "k", "v"):
                    yield _Slot(name, module, f"{role}_proj_weight", 1, 0, (role,))
            continue
        layout = _layout(module)
        if layout is not None and _has_weight(module):
            yield _Slot(name, module, "weight", *layout, _detect_roles(name, module, parents.get(name)))


def _has_weight(module: nn.Module) -> bool:
    # a parametrized weight (sparsified already) still counts, so that a second attempt is named as such
    return isinstance(getattr(module, "weight", None), nn.Parameter) or parametrize.is_parametrized(module, "weight")


def _sequence(recipe: Recipe, key: str, target: NMPattern, group_size: int) -> tuple[NMPattern, ...]:
    walk = recipe.walk
    if walk == "stepwise":
        return tuple(stepwise_patterns(target))
    if walk == "geometric":
        return tuple(geometric_patterns(target, recipe.geometric_k, group_size))
    if walk == "explicit" and key in recipe.patterns:
        return tuple(recipe.patterns[key])
    return (target,)


def _claims(recipe: Recipe, slot: _Slot, key: str) -> list[int]:
    """Indices of the slot's output blocks that recipe key ``key`` asks for."""
    if key.startswith("re:"):
        return list(range(len(slot.block_roles or ("-",)))) if re.fullmatch(key[3:], slot.name) else []
    wanted = _ROLE_GROUPS.get(key, (key,))
    return [i for i, role in enumerate(slot.block_roles or ()) if role in wanted]


def resolve_targets(model: nn.Module, recipe: Recipe) -> list[Target]:
    """Plan which tensors get which patterns; raise `ConfigError` on anything that cannot work."""
    slots = list(_slots(model))
    _reject_unsupported_regex_matches(model, recipe, slots)
    claimed: dict[tuple[int, int], str] = {}  # (slot index, block index) -> key
    for key in recipe.sparsity:
        hits = 0
        for s, slot in enumerate(slots):
            for block in _claims(recipe, slot, key):
                previous = claimed.setdefault((s, block), key)
                if previous != key:
                    raise ConfigError(
                        f"{slot.name}: recipe keys {previous!r} and {key!r} both claim the same weights; "
                        f"each layer may have one pattern only"
                    )
                hits += 1
        if not hits:
            raise NoMatchingTargetError(_no_match_message(key, slots))

    targets, indivisible = [], []
    for s, slot in enumerate(slots):
        blocks = sorted(b for (si, b) in claimed if si == s)
        if not blocks:
            continue
        _check_not_taken(slot)
        tensor = getattr(slot.module, slot.param_name)
        if is_sharded(tensor):
            raise ConfigError(
                f"{slot.name}.{slot.param_name} is already sharded (a DTensor, e.g. by FSDP2's fully_shard); "
                f"call nmflow.sparsify before fully_shard (see docs/distributed.md)"
            )
        n_blocks = len(slot.block_roles or ("-",))
        if tensor.dim() < 2 or tensor.shape[slot.out_dim] % n_blocks:
            raise ConfigError(f"{slot.name}.{slot.param_name}: shape {tuple(tensor.shape)} cannot be sparsified")
        block = tensor.shape[slot.out_dim] // n_blocks
        group_size = tensor.shape[slot.in_dim]
        segments = []
        for b in blocks:
            key = claimed[(s, b)]
            target = recipe.sparsity[key]
            sequence = _sequence(recipe, key, target, group_size)
            bad = [p for p in sequence if group_size % p.m]
            role = slot.block_roles[b] if slot.block_roles else "-"
            if bad:
                indivisible.append(f"{slot.name} ({role}): input size {group_size}, pattern {bad[0]}")
                continue
            segments.append(Segment(key, role, b * block, (b + 1) * block, target, sequence))
        if segments:
            targets.append(
                Target(
                    slot.name,
                    slot.module,
                    slot.param_name,
                    slot.in_dim,
                    slot.out_dim,
                    tensor.shape[slot.out_dim],
                    _merged(segments),
                )
            )
    if indivisible:
        listing = "\n  ".join(indivisible)
        if not recipe.skip_indivisible:
            raise ConfigError(
                f"M does not divide the input dimension of these layers:\n  {listing}\n"
                f"Choose another pattern, exclude them, or set skip_indivisible=True to leave them dense."
            )
        warnings.warn(f"nmflow leaves these layers dense (M does not divide the input):\n  {listing}", stacklevel=3)
        if not targets:
            raise NoMatchingTargetError("no layer is left to sparsify after skipping the indivisible ones")
    _reject_tied(model, targets)
    return targets


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    """Join adjacent blocks under the same key, so a fully claimed packed QKV is one segment."""
    merged = [segments[0]]
    for seg in segments[1:]:
        last = merged[-1]
        if seg.key == last.key and seg.start == last.stop and seg.sequence == last.sequence:
            role = last.role if last.role == seg.role else f"{last.role}{seg.role}"
            merged[-1] = Segment(last.key, role, last.start, seg.stop, last.target, last.sequence)
        else:
            merged.append(seg)
    return tuple(merged)


def _reject_unsupported_regex_matches(model: nn.Module, recipe: Recipe, slots: list[_Slot]) -> None:
    supported = {id(slot.module) for slot in slots}
    for key in recipe.sparsity:
        if not key.startswith("re:"):
            continue
        for name, module in model.named_modules():
            has_own_weights = any(p.dim() > 0 for p in module.parameters(recurse=False))
            if re.fullmatch(key[3:], name) and has_own_weights and id(module) not in supported:
                raise ConfigError(
                    f"{key!r} matches {name} ({type(module).__name__}), which nmflow cannot sparsify; "
                    f"supported: Linear, Conv1D (transformers), Conv1d/2d/3d, Embedding, MultiheadAttention"
                )


def _check_not_taken(slot: _Slot) -> None:
    if parametrize.is_parametrized(slot.module, slot.param_name):
        raise ConfigError(
            f"{slot.name}.{slot.param_name} is already parametrized (sparsified twice?); "
            f"call finalize() on the earlier sparsifier first"
        )


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2, tensor parallel): outside forward it holds only this rank's shard."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _reject_tied(model: nn.Module, targets: list[Target]) -> None:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    for t in targets:
        names = owners.get(id(getattr(t.module, t.param_name)), [])
        if len(set(names)) > 1:
            raise ConfigError(
                f"{t.qualified_name} is tied to {', '.join(n for n in names if not n.startswith(t.name + '.'))}; "
                f"sparsifying it through one module would leave the other dense. Untie it or exclude it."
            )


def _no_match_message(key: str, slots: list[_Slot]) -> str:
    known = sorted({role for slot in slots for role in (slot.block_roles or ())})
    if key.startswith("re:"):
        return f"role {key!r} matches no sparsifiable module name (the regex must match the full name)"
    found = ", ".join(known) if known else "none"
    return (
        f"role {key!r} matches no layer of this model (roles found: {found}). "
        f"Name the layers with 're:<regex>' on full module names instead."
    )
