"""What ``deploy`` will swap, worked out (and checked) before the model changes: from the weights, or a file."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from nmflow import compressed
from nmflow.core.errors import ConfigError
from nmflow.inference.nmlinear import is_conv1d

__all__ = ["Planned", "plan_from_checkpoint", "plan_from_weights", "retie"]

_PARTS = (compressed.VALUES, compressed.INDICES, compressed.SIGNS)


@dataclass
class Planned:
    """One layer to swap: its compressed parts and header entry (the file format's), bias and origin."""

    name: str
    parts: dict[str, torch.Tensor]
    info: dict
    bias: torch.Tensor | None
    source: type[nn.Module]
    requires_grad: bool
    bytes_before: int


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def plan_from_weights(modules: dict[str, nn.Module], layers: list[str] | None) -> list[Planned]:
    """Every module whose weight is exact N:M along its input, encoded as ``save_compressed`` would."""
    planned = []
    for name, module in modules.items():
        if layers is not None and name not in layers:
            continue
        weight, dim = module.weight.detach(), 0 if is_conv1d(module) else 1
        if weight.device.type == "meta":
            raise ConfigError(f"{name}.weight is on the meta device: deploy it with checkpoint=")
        pattern = compressed.choose_pattern(weight, dim)
        if pattern is None:
            continue
        parts, info = compressed.encode(weight, *pattern, dim)
        bias = None if module.bias is None else module.bias.detach()
        requires_grad = module.weight.requires_grad
        planned.append(Planned(name, parts, info, bias, type(module), requires_grad, _nbytes(weight, bias)))
    return planned


def plan_from_checkpoint(
    model: nn.Module, modules: dict[str, nn.Module], path: str | os.PathLike
) -> tuple[list[Planned], dict[str, torch.Tensor], list[list[str]]]:
    """The layers stored compressed in ``path``, the rest of its state, and the model's ties, checked against it.

    A tied tensor (one tensor under several state-dict keys, e.g. an LM head and its input embedding) is in the
    rest once, under its first key; the third item lists each tie's keys, first key first, for :func:`retie`.
    The file stores a tied tensor under every key (``save_compressed`` writes the state dict), so copies that
    differ are refused: loading them would leave the model with one of two weights, chosen by key order.
    """
    header, stored = compressed.read_compressed(path)
    order, infos = header["order"], header["tensors"]
    state = model.state_dict()
    if set(order) != set(state):
        missing, extra = sorted(set(state) - set(order)), sorted(set(order) - set(state))
        raise ConfigError(
            f"{path} is not a checkpoint of this model: it lacks {missing[:3]} and has {extra[:3]} "
            f"({len(missing)} missing, {len(extra)} unexpected keys)"
        )
    lost = [name for name, buffer in model.named_buffers() if buffer.device.type == "meta" and name not in state]
    if lost:
        raise ConfigError(
            f"{lost[0]} is on the meta device and not in any checkpoint (a non-persistent buffer): build the "
            "module that holds it on a real device (e.g. a rotary embedding), then deploy"
        )
    planned, taken = [], set()
    for name, module in modules.items():
        key = name + ".weight"
        if key not in infos:
            continue
        conv1d = is_conv1d(module)
        out_in = tuple(module.weight.shape[::-1] if conv1d else module.weight.shape)
        parts = {suffix: stored[key + suffix] for suffix in _PARTS if key + suffix in stored}
        _check_parts(f"{path}: {key}", out_in, infos[key], parts, conv1d)
        bias = None if module.bias is None else stored[name + ".bias"]
        taken |= {key, name + ".bias"}
        itemsize = parts[compressed.VALUES].element_size()
        bytes_before = math.prod(out_in) * itemsize + _nbytes(bias)
        planned.append(Planned(name, parts, infos[key], bias, type(module), True, bytes_before))
    rest = {}
    for key in order:
        if key in taken:
            continue
        if key in infos:  # compressed but not a layer deploy swaps (an embedding, say): decoded
            parts = {suffix: stored.get(key + suffix) for suffix in _PARTS}
            rest[key] = compressed.decode(key, infos[key], parts, os.fspath(path))
        else:
            rest[key] = stored[key]
        if rest[key].shape != state[key].shape:
            raise ConfigError(
                f"{path}: {key} has shape {tuple(rest[key].shape)}, the model's is {tuple(state[key].shape)}: "
                "is this the checkpoint of another model?"
            )
    ties = []
    for keys in _tied_keys(model, state):
        # a weight deploy swaps for an NMLinear leaves its tie, as it does without a file
        kept = [key for key in keys if key in rest]
        for key in kept[1:]:
            if not _same_bits(rest[kept[0]], rest[key]):
                raise ConfigError(
                    f"{path}: {kept[0]} and {key} differ, but they are one tensor in the model (tied): "
                    "is this the checkpoint of another model?"
                )
            del rest[key]
        if len(kept) > 1:
            ties.append(kept)
    return planned, rest, ties


def _tied_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The state-dict keys of each tensor the model holds under more than one name."""
    keys: dict[int, list[str]] = {}
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if name in state:
            keys.setdefault(id(tensor), []).append(name)
    return [group for group in keys.values() if len(group) > 1]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: -0.0 is not 0.0, and a NaN equals the same NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Make every key of a tie name the tensor its first key holds (the one ``load_state_dict`` assigned).

    ``load_state_dict(assign=True)`` sets each module attribute it loads on its own, so a tie loaded that way
    would become separate tensors: double the memory, and a change to one no longer seen in the other.
    """
    for first, *others in ties:
        owner, _, attr = first.rpartition(".")
        tensor = getattr(model.get_submodule(owner), attr)
        for key in others:
            owner, _, attr = key.rpartition(".")
            setattr(model.get_submodule(owner), attr, tensor)


def _check_parts(where: str, out_in: tuple[int, ...], info: dict, parts: dict[str, torch.Tensor], conv1d: bool) -> None:
    """Refuse a header entry or parts that do not fit the layer, without decoding (the weight stays compressed)."""
    expected_shape, expected_dim = (list(out_in[::-1]), 0) if conv1d else (list(out_in), 1)
    if not isinstance(info, dict) or info.get("shape") != expected_shape or info.get("dim") != expected_dim:
        raise ConfigError(
            f"{where}: stored as shape {info.get('shape') if isinstance(info, dict) else info} grouped along dim "
            f"{info.get('dim') if isinstance(info, dict) else '?'}; the model's layer needs shape {expected_shape} "
            f"grouped along dim {expected_dim}: is this the checkpoint of another model?"
        )
    n, m, bits = info.get("n"), info.get("m"), info.get("index_bits")
    if not (isinstance(n, int) and isinstance(m, int) and m >= 2 and m & (m - 1) == 0 and 1 <= n <= m):
        raise ConfigError(f"{where}: pattern {n!r}:{m!r} is not an N:M with M a power of two")
    if bits != compressed.index_bits(m) or out_in[1] % m:
        raise ConfigError(f"{where}: index_bits {bits!r} or the input size do not fit {n}:{m}")
    kept = out_in[0] * (out_in[1] // m) * n
    values, indices = parts.get(compressed.VALUES), parts.get(compressed.INDICES)
    dtype = compressed.DTYPES.get(info.get("dtype"))
    if values is None or values.dtype != dtype or values.shape != (kept,):
        raise ConfigError(f"{where}: the values are not {kept} entries of {info.get('dtype')}")
    if indices is None or indices.dtype != torch.uint8 or indices.shape != ((kept * bits + 7) // 8,):
        raise ConfigError(f"{where}: the index blob does not hold {kept} positions of {bits} bits")
    if (compressed.SIGNS in parts) != bool(info.get("zero_signs")):
        raise ConfigError(f"{where}: the zero-sign part does not match the header")
