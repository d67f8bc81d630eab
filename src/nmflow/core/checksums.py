"""CRC-32 checksums of tensors and sparsifier states: damage to a saved file must not pass for other weights.

CRC-32 (zlib) catches every single-bit flip and every burst of up to 32 bits, and any other random damage but
one time in 4 billion; it runs at several GB/s and releases the GIL. It guards against accidents, not forgery:
whoever can rewrite a file can rewrite its checksum too.
"""

from __future__ import annotations

import ctypes
import json
import zlib

import torch

from nmflow.core.errors import ConfigError

__all__ = ["crc32_of", "state_checksum"]


def crc32_of(tensor: torch.Tensor, value: int = 0) -> int:
    """CRC-32 of a CPU tensor's bytes as laid out in memory (row-major), continuing from ``value``."""
    tensor = tensor.contiguous()
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return zlib.crc32(b"", value)
    return zlib.crc32((ctypes.c_char * size).from_address(tensor.data_ptr()), value)  # read in place, no copy


def state_checksum(state: dict) -> int:
    """CRC-32 of a sparsifier state's version, step, run length, recipe and fixed masks (all but the checksum).

    Written by `Sparsifier.state_dict` since nmflow 0.3 and checked on load when present (older states lack it).
    """
    try:
        text = json.dumps([state["version"], state["step"], state["total_steps"], state["recipe"]], sort_keys=True)
        digest = zlib.crc32(text.encode())
        for name, mask in sorted(state["fixed_masks"].items()):
            digest = zlib.crc32(f"{name}{list(mask.shape)}".encode(), digest)
            digest = crc32_of(mask.detach().to("cpu", torch.uint8), digest)
    except (TypeError, ValueError, AttributeError) as err:
        raise ConfigError(
            f"sparsifier state is damaged: it is not laid out as state_dict() writes it ({err})"
        ) from None
    return digest
