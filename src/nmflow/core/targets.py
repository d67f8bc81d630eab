"""Which tensors of a model a recipe sparsifies, in two passes: find the candidates, then let the recipe claim them.

Candidates are every Linear / Conv1D / ConvNd / Embedding weight, MultiheadAttention projection and 3-D expert
weight; each gets the roles of its output rows from the table `nmflow.core.roles.ROLE_RULES` (packed Q/K/V
rows from `nmflow.core.layouts.packed_layout`). Anything else is reached with ``re:<regex>`` on full module
names. Resolution only *plans*: it reads the model and changes nothing, so a bad recipe fails before any layer
is touched.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmflow.core.errors import ConfigError, NoMatchingTargetError
from nmflow.core.layouts import Layout, block_rows, expert_weights, packed_layout, weight_layout
from nmflow.core.masks import NMPattern
from nmflow.core.recipes import Recipe
from nmflow.core.roles import NEVER_SCOPE, ROLE_RULES, ROLES_WITHIN
from nmflow.core.schedules import geometric_patterns, stepwise_patterns

__all__ = ["ROLE_RULES", "Segment", "Target", "is_sharded", "resolve_targets"]  # ROLE_RULES: the 0.2 path

_COMPILED_RULES = tuple((re.compile(rf"(?:^|\.)(?:{pattern})$"), roles, kind) for pattern, roles, kind in ROLE_RULES)
_NEVER = re.compile(NEVER_SCOPE)


@dataclass(frozen=True)
class Segment:
    """Output rows ``[start, stop)`` of each of ``groups`` periods of one tensor, under one recipe key."""

    key: str  # the recipe key that claimed it: "ff", "qk", "re:..."
    role: str  # what it is: "ff", "q", "qk", ..., or "-" for a layer of no known role (reached by regex)
    start: int
    stop: int
    sequence: tuple[NMPattern, ...]  # patterns walked over the sparse window; the last is the target
    groups: int = 1  # > 1 for rows interleaved per head (NeoX, BLOOM) or per kv group (Falcon)

    @property
    def target(self) -> NMPattern:
        return self.sequence[-1]

    @property
    def rows(self) -> int:
        return self.groups * (self.stop - self.start)


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
        return len(self.segments) == 1 and self.segments[0].start == 0 and self.segments[0].rows == self.out_size

    @property
    def qualified_name(self) -> str:
        return self.name if self.param_name == "weight" else f"{self.name}.{self.param_name}"

    @property
    def group_size(self) -> int:
        return getattr(self.module, self.param_name).shape[self.in_dim]

    def block(self, tensor: torch.Tensor, segment: Segment) -> torch.Tensor:
        """A view of ``segment``'s rows of ``tensor`` (shaped like this target's tensor); groups run along
        `block_in_dim`."""
        return block_rows(tensor, self.out_dim, segment.groups, segment.start, segment.stop)

    def rows_text(self, segment: Segment) -> str:
        """``all``, ``start:stop``, or ``start:stop of every period`` for rows interleaved per head."""
        if segment.start == 0 and segment.rows == self.out_size:
            return "all"
        if segment.groups == 1:
            return f"{segment.start}:{segment.stop}"
        return f"{segment.start}:{segment.stop} of {segment.groups}x{self.out_size // segment.groups}"

    @property
    def block_in_dim(self) -> int:
        return self.in_dim + 1 if self.in_dim > self.out_dim else self.in_dim


@dataclass(frozen=True)
class _Slot:
    """A tensor that could be sparsified, before the recipe is consulted."""

    name: str
    module: nn.Module
    param_name: str
    in_dim: int
    out_dim: int
    layout: Layout  # every block's role; one block "-" when no role is known
    known: bool  # roles come from the table (False: regex only)
    packed_roles: tuple[str, ...] = ()  # a packed tensor whose layout is unknown: the roles it holds

    @property
    def qualified_name(self) -> str:
        return self.name if self.param_name == "weight" else f"{self.name}.{self.param_name}"


# ------------------------------------------------------------------ pass 1: candidates
def _never(name: str) -> bool:
    return bool(_NEVER.search(f"{name}."))


def _rule_for(name: str, module: nn.Module, parent: nn.Module | None) -> tuple[tuple[str, ...], str | None] | None:
    """(roles, packed layout kind) of a module's weight, or None when no role is known."""
    if _never(name) or isinstance(module, nn.Embedding):
        return None
    torch_layer = isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
    if torch_layer and name.rsplit(".", 1)[-1] in ("linear1", "linear2"):
        return ("ff",), None
    for pattern, roles, kind in _COMPILED_RULES:
        if pattern.search(name):
            return roles, kind
    return None


def _slot(name: str, module: nn.Module, param: str, rule: Any, config: Any, dims: tuple[int, int]) -> _Slot:
    out = getattr(module, param).shape[dims[1]]
    roles, kind = rule if rule is not None else (None, None)
    if not roles:  # no role, or a known layer that stays dense (router)
        return _Slot(name, module, param, *dims, Layout.split([("-", out)]), roles is not None)
    if kind is None:
        return _Slot(name, module, param, *dims, Layout.split([(roles[0], out)]), True)
    layout = packed_layout(kind, out, config)
    if layout is None or {role for role, _, _ in layout.blocks} != set(roles):
        return _Slot(name, module, param, *dims, Layout.split([("".join(roles), out)]), True, roles)
    return _Slot(name, module, param, *dims, layout, True)


def _slots_of(name: str, module: nn.Module, parent: nn.Module | None, config: Any) -> list[_Slot]:
    """The candidate tensors one module owns (none for most modules)."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            rules = {"in_proj_weight": (("q", "k", "v"), "in_proj_weight")}
        else:
            rules = {f"{role}_proj_weight": ((role,), None) for role in ("q", "k", "v")}
        return [_slot(name, module, p, None if _never(name) else r, config, (1, 0)) for p, r in rules.items()]
    slots = []
    for param in expert_weights(name, module):
        rule = None if _never(name) else (("experts",), None)
        dims = weight_layout(module, param) or (-1, 1)  # -1: orientation unknown, refused if claimed
        slots.append(_slot(name, module, param, rule, config, dims))
    dims = weight_layout(module)
    if dims is not None and _has_weight(module):
        slots.append(_slot(name, module, "weight", _rule_for(name, module, parent), config, dims))
    return slots


def _candidates(model: nn.Module) -> list[_Slot]:
    """Every tensor nmflow can sparsify, with the roles of its rows."""
    parents = {f"{n}.{c}" if n else c: m for n, m in model.named_modules() for c, _ in m.named_children()}
    configs = {n: m.config for n, m in model.named_modules() if hasattr(getattr(m, "config", None), "model_type")}
    return [
        slot
        for name, module in model.named_modules()
        for slot in _slots_of(name, module, parents.get(name), _nearest(configs, name))
    ]


def _nearest(configs: dict[str, Any], name: str) -> Any:
    """The HF config of ``name`` or of its closest ancestor that has one (None for plain torch models)."""
    while True:
        if name in configs:
            config = configs[name]
            return config.get_text_config() if hasattr(config, "get_text_config") else config
        if not name:
            return None
        name = _parent(name)


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _has_weight(module: nn.Module) -> bool:
    # a parametrized weight (sparsified already) still counts, so that a second attempt is named as such
    return isinstance(getattr(module, "weight", None), nn.Parameter) or parametrize.is_parametrized(module, "weight")


# ------------------------------------------------------------------ pass 2: the recipe claims blocks
_Claims = dict[tuple[int, int], str]  # (slot index, block index) -> recipe key


def _wanted(recipe: Recipe, key: str) -> set[str]:
    """The roles a recipe key takes; a role the recipe names itself goes to that key instead."""
    within = ROLES_WITHIN.get(key, (key,))
    return {role for role in within if role == key or role not in recipe.sparsity}


def _claimed_blocks(recipe: Recipe, slot: _Slot, key: str) -> list[int]:
    """Indices of the slot's blocks that recipe key ``key`` asks for."""
    if key.startswith("re:"):
        return list(range(len(slot.layout.blocks))) if re.fullmatch(key[3:], slot.name) else []
    if not slot.known:
        return []
    wanted = _wanted(recipe, key)
    if slot.packed_roles:
        asked = wanted & set(slot.packed_roles)
        if asked and asked != set(slot.packed_roles):
            raise ConfigError(
                f"{slot.qualified_name} packs {', '.join(slot.packed_roles)} in a layout nmflow cannot establish "
                f"for this model, so {key!r} cannot take {', '.join(sorted(asked))} alone; sparsify the whole "
                f"tensor ('qkv' or 're:{re.escape(slot.name)}') or leave it out"
            )
        return [0] if asked else []
    return [i for i, (role, _, _) in enumerate(slot.layout.blocks) if role in wanted]


def _claim(recipe: Recipe, slots: list[_Slot]) -> _Claims:
    claimed: _Claims = {}
    for key in recipe.sparsity:
        hits = 0
        for s, slot in enumerate(slots):
            for block in _claimed_blocks(recipe, slot, key):
                previous = claimed.setdefault((s, block), key)
                if previous != key:
                    raise ConfigError(
                        f"{slot.qualified_name}: recipe keys {previous!r} and {key!r} both claim the same weights; "
                        f"each layer may have one pattern only"
                    )
                hits += 1
        if not hits:
            raise NoMatchingTargetError(_no_match_message(key, slots))
    return claimed


def _excluded(recipe: Recipe, slots: list[_Slot]) -> list[_Slot]:
    """The candidates left after ``recipe.exclude``; each exclude pattern must name one of them."""
    for pattern in recipe.exclude:
        if not any(re.fullmatch(pattern, slot.name) for slot in slots):
            raise NoMatchingTargetError(f"exclude pattern {pattern!r} matches no sparsifiable module name")
    return [slot for slot in slots if not any(re.fullmatch(p, slot.name) for p in recipe.exclude)]


def _sequence(recipe: Recipe, key: str, group_size: int) -> tuple[NMPattern, ...]:
    target, walk = recipe.sparsity[key], recipe.walk
    if walk == "stepwise":
        return tuple(stepwise_patterns(target))
    if walk == "geometric":
        return tuple(geometric_patterns(target, recipe.geometric_k, group_size))
    if walk == "explicit" and key in recipe.patterns:
        return tuple(recipe.patterns[key])
    return (target,)


def _target(recipe: Recipe, slot: _Slot, blocks: dict[int, str], indivisible: list[str]) -> Target | None:
    """The target of one claimed slot; blocks whose input M does not divide go to ``indivisible``."""
    _check_claimable(slot)
    tensor = getattr(slot.module, slot.param_name)
    group_size = tensor.shape[slot.in_dim]
    segments = []
    for b, key in sorted(blocks.items()):
        role, start, stop = slot.layout.blocks[b]
        sequence = _sequence(recipe, key, group_size)
        bad = [p for p in sequence if group_size % p.m]
        if bad:
            indivisible.append(f"{slot.qualified_name} ({role}): input size {group_size}, pattern {bad[0]}")
            continue
        segments.append(Segment(key, role, start, stop, sequence, slot.layout.groups))
    if not segments:
        return None
    out_size = tensor.shape[slot.out_dim]
    return Target(slot.name, slot.module, slot.param_name, slot.in_dim, slot.out_dim, out_size, _merged(segments))


def resolve_targets(model: nn.Module, recipe: Recipe) -> list[Target]:
    """Plan which tensors get which patterns; raise `ConfigError` on anything that cannot work."""
    everything = _candidates(model)
    _reject_unsupported_regex_matches(model, recipe, everything)
    slots = _excluded(recipe, everything)
    claimed = _claim(recipe, slots)
    by_slot: dict[int, dict[int, str]] = {}
    for (s, block), key in claimed.items():
        by_slot.setdefault(s, {})[block] = key
    targets, indivisible = [], []
    for s, blocks in sorted(by_slot.items()):
        target = _target(recipe, slots[s], blocks, indivisible)
        if target is not None:
            targets.append(target)
    if indivisible:
        _skip_or_refuse(recipe, indivisible, bool(targets))
    _reject_tied(model, targets)
    _warn_unclaimed_neighbours(recipe, slots, claimed)
    return targets


def _skip_or_refuse(recipe: Recipe, indivisible: list[str], any_left: bool) -> None:
    listing = "\n  ".join(indivisible)
    if not recipe.skip_indivisible:
        raise ConfigError(
            f"M does not divide the input dimension of these layers:\n  {listing}\n"
            f"Choose another pattern, exclude them, or set skip_indivisible=True to leave them dense."
        )
    warnings.warn(f"nmflow leaves these layers dense (M does not divide the input):\n  {listing}", stacklevel=4)
    if not any_left:
        raise NoMatchingTargetError("no layer is left to sparsify after skipping the indivisible ones")


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    """Join adjacent blocks under the same key, so a fully claimed packed QKV is one segment."""
    merged = [segments[0]]
    for seg in segments[1:]:
        last = merged[-1]
        if seg.key == last.key and seg.start == last.stop and seg.sequence == last.sequence:
            role = last.role if last.role == seg.role else f"{last.role}{seg.role}"
            merged[-1] = Segment(last.key, role, last.start, seg.stop, last.sequence, last.groups)
        else:
            merged.append(seg)
    return tuple(merged)


# ------------------------------------------------------------------ checks
def _warn_unclaimed_neighbours(recipe: Recipe, slots: list[_Slot], claimed: _Claims) -> None:
    """Warn when a role takes layers of a block but a sibling weight of no known role stays dense.

    E.g. an MLP with ``down_proj`` and a fused projection the table does not know: half the block would stay
    dense without a word. Known dense layers (routers), regex claims and excluded layers do not count.
    """
    role_claimed = {_parent(slots[s].name) for (s, _), key in claimed.items() if not key.startswith("re:")}
    taken = {s for s, _ in claimed}
    lonely = [
        slot.qualified_name
        for s, slot in enumerate(slots)
        if not slot.known
        and s not in taken
        and not isinstance(slot.module, nn.Embedding)  # relative position tables (T5) are no block weights
        and _parent(slot.name) in role_claimed
    ]
    if lonely:
        warnings.warn(
            f"nmflow leaves these layers dense although their neighbours are sparsified; they match no role: "
            f"{', '.join(lonely)}. Name them with 're:<regex>', or pass exclude= to keep them dense quietly.",
            stacklevel=4,
        )


def _check_claimable(slot: _Slot) -> None:
    if parametrize.is_parametrized(slot.module, slot.param_name):
        raise ConfigError(
            f"{slot.qualified_name} is already parametrized (sparsified twice?); "
            f"call finalize() on the earlier sparsifier first"
        )
    tensor = getattr(slot.module, slot.param_name)
    if is_sharded(tensor):
        raise ConfigError(
            f"{slot.qualified_name} is already sharded (a DTensor, e.g. by FSDP2's fully_shard); "
            f"call nmflow.sparsify before fully_shard (see docs/distributed.md)"
        )
    if slot.in_dim < 0:
        raise ConfigError(
            f"{slot.qualified_name}: cannot tell which dimension of this 3-D expert weight is the input "
            f"({type(slot.module).__name__} has no `is_transposed`); leave it out with exclude="
        )
    if tensor.dim() < 2:
        raise ConfigError(f"{slot.qualified_name}: shape {tuple(tensor.shape)} cannot be sparsified")


def _reject_unsupported_regex_matches(model: nn.Module, recipe: Recipe, slots: list[_Slot]) -> None:
    supported = {id(slot.module) for slot in slots}
    for key in recipe.sparsity:
        if not key.startswith("re:"):
            continue
        for name, module in model.named_modules():
            has_own_weights = any(p.dim() > 0 for p in module.parameters(recurse=False))
            if re.fullmatch(key[3:], name) and has_own_weights and id(module) not in supported:
                raise ConfigError(
                    f"{key!r} matches {name} ({type(module).__name__}), which nmflow cannot sparsify; supported: "
                    f"Linear, Conv1D (transformers), Conv1d/2d/3d, Embedding, MultiheadAttention, 3-D experts"
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
    if key.startswith("re:"):
        return f"role {key!r} matches no sparsifiable module name (the regex must match the full name)"
    known = sorted({r for slot in slots if slot.known for r in (*slot.packed_roles, *_roles(slot)) if r != "-"})
    found = ", ".join(known) if known else "none"
    return (
        f"role {key!r} matches no layer of this model (roles found: {found}). "
        f"Name the layers with 're:<regex>' on full module names instead."
    )


def _roles(slot: _Slot) -> list[str]:
    return [role for role, _, _ in slot.layout.blocks] if not slot.packed_roles else []
