"""A lossless compressed checkpoint for N:M-sparse weights: kept values plus bit-packed in-group indices.

Format (one safetensors file, version 2). The metadata entry ``"nmflow"`` holds a JSON header::

    {"format": "nmflow-nm", "version": 2, "order": [every state_dict key, in order],
     "tensors": {name: {"n", "m", "dim", "shape", "dtype", "index_bits", "zero_signs"}},
     "stored": {every stored key: {"dtype", "shape", "crc32"}}}

and the metadata entry ``"nmflow.crc32"`` the CRC-32 of that header's UTF-8 text, so every byte of the file is
covered: the header by its own checksum, each stored tensor's bytes (packing padding included) by its
``crc32``, and the safetensors header's dtypes, shapes and offsets by the recorded ``dtype``/``shape`` and the
checksums of the bytes they point at. Version 1 had no ``"stored"`` and no header checksum; it still loads,
with a warning that it is unchecked.

A tensor listed in ``"tensors"`` is stored as three parts (grouping along ``dim``, its input dimension):

* ``<name>::nm.values``: exactly ``n`` values per group of ``m``, groups in row-major order of the tensor with
  ``dim`` moved last, values in ascending in-group position, original dtype. A group with fewer than ``n``
  non-zeros also keeps its lowest-index zeros, so every stored value is the original bit pattern.
* ``<name>::nm.indices``: the in-group position of each kept value, ``index_bits = ceil(log2 m)`` bits each,
  packed least significant bit first into uint8.
* ``<name>::nm.zero_signs`` (only when ``zero_signs`` is true): one packed bit per dropped entry, set where it
  was ``-0.0`` (``finalize()`` writes ``+0.0``, so its output needs none; a ``w * mask`` elsewhere may not).

Every other tensor is stored as is under its own name.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import nn

from nmflow.core.checksums import crc32_of
from nmflow.core.errors import ConfigError
from nmflow.core.layouts import weight_input_dims

FORMAT = "nmflow-nm"
VERSION = 2
_UNCHECKED_VERSION = 1  # read, with a warning: it carries no checksums
_HEADER, _HEADER_CRC = "nmflow", "nmflow.crc32"
VALUES, INDICES, SIGNS = "::nm.values", "::nm.indices", "::nm.zero_signs"  # suffixes of a tensor's stored parts
_CANDIDATE_M = tuple(2**k for k in range(1, 12))  # 2 .. 2048
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.float64, torch.float32, torch.float16)}
DTYPES["bfloat16"] = torch.bfloat16
_BIT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


# ------------------------------------------------------------------ bit packing
def index_bits(m: int) -> int:
    """Bits needed for an in-group position 0 .. m-1."""
    return max(1, math.ceil(math.log2(m)))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into uint8, ``bits`` each, least significant bit first."""
    shifts = torch.arange(bits, dtype=torch.int32, device=values.device)
    stream = ((values.reshape(-1, 1).to(torch.int32) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=values.device)
    return (stream.reshape(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` integers (int64) of ``bits`` bits each."""
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.reshape(-1, 1) >> byte_shifts) & 1).reshape(-1)[: count * bits]
    shifts = torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream.reshape(count, bits).to(torch.int64) << shifts).sum(-1)


def _packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ------------------------------------------------------------------ choosing a pattern
def _groups(tensor: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """[rows * groups, m] view of ``tensor`` with ``dim`` moved last and cut into groups of ``m``."""
    return tensor.movedim(dim, -1).reshape(-1, m)


def _negative_zeros(tensor: torch.Tensor) -> torch.Tensor:
    as_int = tensor.view(_BIT_VIEW[tensor.element_size()])
    return (tensor == 0) & (as_int != 0)


def compressed_bytes(numel: int, n: int, m: int, itemsize: int, zero_signs: bool) -> int:
    """Stored bytes of an N:M tensor in this format (values + packed indices + optional dropped-zero signs)."""
    kept = numel // m * n
    signs = _packed_bytes(numel - kept, 1) if zero_signs else 0
    return kept * itemsize + _packed_bytes(kept, index_bits(m)) + signs


def choose_pattern(tensor: torch.Tensor, dim: int) -> tuple[int, int] | None:
    """The exact (N, M) with the fewest stored bytes, or None when storing ``tensor`` dense is no larger.

    M ranges over the powers of two 2 .. 2048 that divide the input size; N is the realized largest
    non-zero count per group, so the pattern is exact by construction. Signs of dropped ``-0.0`` entries are
    costed whenever the tensor holds any ``-0.0`` (an upper bound: some may end up kept as padding).
    """
    if tensor.dtype not in DTYPES.values() or tensor.dim() == 0 or tensor.numel() == 0:
        return None
    size, itemsize = tensor.shape[dim], tensor.element_size()
    has_negative_zero = bool(_negative_zeros(tensor).any())
    best, best_bytes = None, tensor.numel() * itemsize
    nonzero = (tensor != 0).movedim(dim, -1)
    for m in _CANDIDATE_M:
        if m > size or size % m:
            continue
        n = max(1, int(nonzero.reshape(-1, m).sum(-1).max()))
        cost = compressed_bytes(tensor.numel(), n, m, itemsize, has_negative_zero)
        if cost < best_bytes:
            best, best_bytes = (n, m), cost
    return best


# ------------------------------------------------------------------ encode / decode one tensor
def encode(tensor: torch.Tensor, n: int, m: int, dim: int) -> tuple[dict[str, torch.Tensor], dict]:
    groups = _groups(tensor, m, dim)
    # nonzeros first, then zeros, each by position (stable sort); keep the first n, back in position order
    order = torch.sort((groups == 0).to(torch.uint8), dim=-1, stable=True).indices
    kept_positions = order[:, :n].sort(dim=-1).values
    parts = {
        VALUES: groups.gather(-1, kept_positions).reshape(-1).clone(),
        INDICES: pack_bits(kept_positions.reshape(-1), index_bits(m)),
    }
    dropped = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, kept_positions, False)
    dropped_negative = _negative_zeros(groups)[dropped]
    if bool(dropped_negative.any()):
        parts[SIGNS] = pack_bits(dropped_negative, 1)
    header = {
        "n": n,
        "m": m,
        "dim": dim,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "index_bits": index_bits(m),
        "zero_signs": SIGNS in parts,
    }
    return parts, header


class _Entry(NamedTuple):
    """One compressed tensor's header entry, checked against its stored parts."""

    n: int
    m: int
    dim: int
    shape: list[int]
    dtype: torch.dtype
    bits: int


def _check_entry(name: str, info: object, parts: dict[str, torch.Tensor | None], where: str) -> _Entry:
    """Check a header entry and the dtype and shape of every stored part against it (indices are not unpacked)."""

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{where}: tensor {name!r}: {problem}")

    try:
        n, m, dim, shape, dtype_name = info["n"], info["m"], info["dim"], info["shape"], info["dtype"]
        bits, zero_signs = info["index_bits"], info["zero_signs"]
    except (KeyError, TypeError) as exc:
        raise bad(f"header entry is incomplete ({exc!r})") from None
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise bad(f"header shape {shape!r} is not a list of sizes")
    if not (isinstance(m, int) and isinstance(n, int) and m >= 2 and 1 <= n <= m):
        raise bad(f"header pattern {n!r}:{m!r} is not a valid N:M")
    if not (isinstance(dim, int) and 0 <= dim < len(shape) and shape[dim] % m == 0):
        raise bad(f"header dim {dim!r} does not split shape {shape} into groups of {m}")
    if dtype_name not in DTYPES:
        raise bad(f"header dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    if bits != index_bits(m) or not isinstance(zero_signs, bool):
        raise bad(f"header index_bits {bits!r} / zero_signs {zero_signs!r} do not match {n}:{m}")
    numel = math.prod(shape)
    kept, dtype = numel // m * n, DTYPES[dtype_name]
    values, packed, signs = parts[VALUES], parts[INDICES], parts[SIGNS]
    if values is None or packed is None or (signs is None) == zero_signs:
        raise bad("the stored parts do not match the header (a part is missing or unexpected)")
    if values.dtype != dtype or values.shape != (kept,):
        raise bad(f"values are {values.dtype} {tuple(values.shape)}, header says {dtype} ({kept},)")
    if packed.dtype != torch.uint8 or packed.shape != (_packed_bytes(kept, bits),):
        raise bad(f"index blob is {packed.dtype} {tuple(packed.shape)}, expected uint8 ({_packed_bytes(kept, bits)},)")
    if signs is not None and (signs.dtype != torch.uint8 or signs.shape != (_packed_bytes(numel - kept, 1),)):
        raise bad(
            f"zero-sign blob is {signs.dtype} {tuple(signs.shape)}, expected uint8 ({_packed_bytes(numel - kept, 1)},)"
        )
    return _Entry(n, m, dim, shape, dtype, bits)


def decode(name: str, info: dict, parts: dict[str, torch.Tensor | None], where: str) -> torch.Tensor:
    """Rebuild one tensor, checking every part against the header and every index against M first."""
    n, m, dim, shape, dtype, bits = _check_entry(name, info, parts, where)
    numel = math.prod(shape)
    kept = numel // m * n
    values, packed, signs = parts[VALUES], parts[INDICES], parts[SIGNS]
    positions = unpack_bits(packed, bits, kept).reshape(-1, n)
    if kept and (int(positions.max()) >= m or bool((positions.diff(dim=-1) <= 0).any())):
        raise ConfigError(f"{where}: tensor {name!r}: index blob holds positions out of range or out of order")

    moved_shape = [*shape[:dim], *shape[dim + 1 :], shape[dim]]
    groups = torch.zeros(numel // m, m, dtype=dtype)
    if signs is not None:
        dropped = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, positions, False)
        negative = unpack_bits(signs, 1, numel - kept).bool()
        groups[dropped] = torch.where(negative, -0.0, 0.0).to(dtype)
    groups.scatter_(-1, positions, values.reshape(-1, n))
    return groups.reshape(moved_shape).movedim(-1, dim).contiguous()


# ------------------------------------------------------------------ public API
def save_compressed(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    layouts: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Write a lossless compressed checkpoint; returns ``{name: "N:M"}`` for the tensors stored compressed.

    With a model, every Linear / Conv1D / ConvNd / Embedding weight and MultiheadAttention projection is a
    candidate, grouped along its input dim; ``layouts`` ({state-dict key: input dim}) adds or overrides
    candidates and is the only source of candidates for a plain state dict. Each candidate gets the cheapest
    exact pattern it already has (see :func:`choose_pattern`), so no sparsifier is needed; a tensor that is
    not N:M throughout (e.g. a packed QKV with only some blocks sparse) is stored dense.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        candidates = {**weight_input_dims(model_or_state_dict), **(layouts or {})}
    else:
        state, candidates = dict(model_or_state_dict), dict(layouts or {})
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        if name.endswith((VALUES, INDICES, SIGNS)):
            raise ConfigError(f"state_dict key {name!r} ends with a suffix this format reserves")
    for name, dim in (layouts or {}).items():
        if name not in state:
            raise ConfigError(f"layouts names {name!r}, which is not in the state dict")
        if not (isinstance(dim, int) and -state[name].dim() <= dim < state[name].dim()):
            raise ConfigError(f"layouts[{name!r}] = {dim!r} is not a dim of a {state[name].dim()}-d tensor")

    tensors, header, chosen, seen_storages = {}, {}, {}, set()
    for name, value in state.items():
        value = value.detach().cpu()
        dim = candidates.get(name)
        pattern = choose_pattern(value, dim % value.dim()) if dim is not None and value.dim() else None
        if pattern is None:
            storage = value.untyped_storage().data_ptr()
            shared = storage in seen_storages and value.numel() > 0
            seen_storages.add(storage)
            tensors[name] = value.clone() if shared else value.contiguous()  # safetensors refuses shared memory
            continue
        n, m = pattern
        parts, header[name] = encode(value, n, m, dim % value.dim())
        tensors.update({name + suffix: part for suffix, part in parts.items()})
        chosen[name] = f"{n}:{m}"
    text = json.dumps(
        {"format": FORMAT, "version": VERSION, "order": list(state), "tensors": header, "stored": _describe(tensors)}
    )
    metadata = {_HEADER: text, _HEADER_CRC: str(zlib.crc32(text.encode()))}

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        _sync(temporary)  # on disk before the rename, so a crash leaves the old file or the whole new one
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    if os.name == "posix":
        _sync(folder)  # the rename itself
    return chosen


def _sync(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# ------------------------------------------------------------------ checksums
def _describe(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """``{key: {"dtype", "shape", "crc32"}}`` of every stored tensor, the biggest checksummed first."""
    keys = sorted(tensors, key=lambda key: -tensors[key].numel() * tensors[key].element_size())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checksums = dict(zip(keys, pool.map(lambda key: crc32_of(tensors[key]), keys)))
    return {
        key: {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "crc32": checksums[key]}
        for key, tensor in tensors.items()
    }


def _parse_header(path: str, metadata: Mapping[str, str]) -> dict:
    """The nmflow header, its own checksum verified before it is parsed; warns for an unchecked version-1 file."""
    text, recorded = metadata.get(_HEADER), metadata.get(_HEADER_CRC)
    if text is None:
        raise ConfigError(f"{path}: not an nmflow compressed checkpoint (no 'nmflow' header)")
    if recorded is not None and recorded != str(zlib.crc32(text.encode())):
        raise ConfigError(f"{path}: the nmflow header is corrupted (its CRC-32 differs from the recorded one)")
    try:
        header = json.loads(text)
        version, order, infos = header["version"], header["order"], header["tensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: the nmflow header is not valid ({exc!r})") from None
    if header.get("format") != FORMAT or type(version) is not int or version not in (VERSION, _UNCHECKED_VERSION):
        raise ConfigError(
            f"{path}: format {header.get('format')!r} version {version!r}; "
            f"this nmflow reads {FORMAT!r} versions {_UNCHECKED_VERSION} and {VERSION}"
        )
    if (version == VERSION) != (recorded is not None):
        raise ConfigError(f"{path}: a version {version} header {'without' if recorded is None else 'with'} a checksum")
    if not (isinstance(order, list) and all(isinstance(k, str) for k in order) and isinstance(infos, dict)):
        raise ConfigError(f"{path}: the nmflow header's tensor list is not valid")
    if not set(infos) <= set(order):
        raise ConfigError(f"{path}: the nmflow header's tensor list is not valid")
    if version == _UNCHECKED_VERSION:
        warnings.warn(
            f"{path}: compressed checkpoint format version 1 carries no checksums, so damage to its values or "
            "indices cannot be detected; loading it unchecked (save it again to write version 2)",
            stacklevel=3,
        )
    return header


def _check_stored(path: str, header: dict, stored: dict[str, torch.Tensor]) -> None:
    """Every stored tensor is one the header expects; in version 2, with the recorded dtype, shape and CRC-32."""
    order, infos = header["order"], header["tensors"]
    expected_keys = {name for name in order if name not in infos}
    for name, info in infos.items():
        expected_keys |= {name + VALUES, name + INDICES}
        if isinstance(info, dict) and info.get("zero_signs"):
            expected_keys.add(name + SIGNS)
    if expected_keys != set(stored):
        missing, extra = sorted(expected_keys - set(stored)), sorted(set(stored) - expected_keys)
        raise ConfigError(f"{path}: stored tensors do not match the header (missing {missing}, unexpected {extra})")
    if header["version"] == _UNCHECKED_VERSION:
        return
    recorded = header.get("stored")
    if not (isinstance(recorded, dict) and set(recorded) == set(stored)):
        raise ConfigError(f"{path}: the header's checksum list does not match the stored tensors")
    for key, found in _describe(stored).items():
        expected = recorded[key]
        if found == expected:
            continue
        layout = {"dtype": found["dtype"], "shape": found["shape"]}
        if isinstance(expected, dict) and layout == {k: expected.get(k) for k in layout}:
            raise ConfigError(f"{path}: stored tensor {key!r} is corrupted (its CRC-32 differs from the recorded one)")
        raise ConfigError(f"{path}: stored tensor {key!r} is {layout}, the header recorded {expected}")


def read_compressed(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The parsed JSON header and the raw stored tensors of a checkpoint, after every check.

    Checked: the file is safetensors, the header's own CRC-32, the format and version, that the stored keys are
    exactly those the header implies, each stored tensor's dtype, shape and CRC-32 (version 2), and each
    compressed entry against its parts' dtypes and shapes. Not checked here: that the unpacked in-group indices
    are in range and ascending (:func:`load_compressed` does that as it decodes; in a version-2 file the CRC-32
    already vouches that they are the bytes :func:`save_compressed` wrote). Raises :class:`ConfigError` naming
    the file and the tensor; a version-1 file (no checksums) loads with a warning. As with safetensors'
    ``load_file``, the tensors are views of the file's memory map: copy them before overwriting the file in
    place (``save_compressed`` replaces it, which leaves them intact).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt") as reader:
            metadata = reader.metadata() or {}
            stored = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types (and OSError) for broken files
        raise ConfigError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    header = _parse_header(path, metadata)
    _check_stored(path, header, stored)
    for name, info in header["tensors"].items():
        _check_entry(name, info, {suffix: stored.get(name + suffix) for suffix in (VALUES, INDICES, SIGNS)}, path)
    return header, stored


def load_compressed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by :func:`save_compressed`: a plain state dict, bitwise equal to the original.

    Everything is checked (see :func:`read_compressed`) before anything is returned. Tensors stored dense are
    views of the file's memory map, as with safetensors' ``load_file``.
    """
    header, stored = read_compressed(path)
    path, infos = os.fspath(path), header["tensors"]
    result = {}
    for name in header["order"]:
        if name in infos:
            parts = {suffix: stored.get(name + suffix) for suffix in (VALUES, INDICES, SIGNS)}
            result[name] = decode(name, infos[name], parts, path)
        else:
            result[name] = stored[name]
    return result
