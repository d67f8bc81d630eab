"""The C++ N:M kernel (``csrc/nm_linear.cpp``): built with ``torch.utils.cpp_extension`` at first use, then loaded.

The build takes about 15 s once; torch caches it in its extensions folder (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and rebuilds only when the source or the flags change. ``-march=native`` lets the
compiler use what this CPU has (the AVX-512 path needs F/BW/VL/VBMI; otherwise a portable path is compiled).
When a compiler, ninja or the build itself is missing or fails, :func:`available` returns False and
:func:`unavailable_reason` says why; ``nmflow.deploy`` then warns once and falls back to pure PyTorch.
``NMFLOW_NO_KERNEL=1`` turns the kernel off on purpose.
"""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["available", "densify", "isa", "linear", "unavailable_reason"]

SOURCE = Path(__file__).parent / "csrc" / "nm_linear.cpp"
NAME = "nmflow_nm_kernel"
LARGE_FROM = 4  # batch rows from which the portable path streams x^T instead of gathering from x

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "linear": the loaded operator, or "error": why not


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for threads only when the extension is built with it
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine().lower() in ("x86_64", "amd64") else "-mcpu=native")
    return flags


def _build() -> None:
    """Compile (or reuse torch's cached build of) the extension and register its operators."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _load() -> bool:
    with _lock:
        if not _state:
            if os.environ.get("NMFLOW_NO_KERNEL", "") not in ("", "0"):
                _state["error"] = "NMFLOW_NO_KERNEL is set"
            else:
                try:
                    _build()
                    _state["linear"] = torch.ops.nmflow_nm.linear.default  # looked up once: calls are per layer
                except Exception as exc:  # compiler, ninja, linker or loader: any of them may be missing
                    message = str(exc).strip().splitlines()
                    _state["error"] = f"{type(exc).__name__}: {message[-1] if message else ''}"[:300]
        return "linear" in _state


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _load()


def unavailable_reason() -> str | None:
    """Why the kernel could not be built or loaded; None when it is available."""
    return None if _load() else str(_state["error"])


def isa() -> str:
    """The path the loaded kernel was compiled with: "avx512-bf16", "avx512", "avx2" or "portable"."""
    return str(torch.ops.nmflow_nm.isa()) if _load() else "unavailable"


def linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    bits: int,
    *,
    portable: bool = False,
) -> torch.Tensor:
    """``x [B, in] @ W.T + bias`` from an NMLinear's parts (``values [out, in/m*n]`` and packed ``indices``, both
    in row-blocks order; see :mod:`nmflow.inference.nmlinear`); ``portable`` forces the path other CPUs take."""
    if "linear" not in _state and not _load():
        raise RuntimeError(f"nmflow's N:M kernel is unavailable: {_state['error']}")
    return _state["linear"](x, values, indices, bias, n, m, bits, LARGE_FROM, int(portable))


def densify(
    values: torch.Tensor, indices: torch.Tensor, n: int, m: int, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense ``[out, in]`` weight (dropped entries +0.0) from an NMLinear's parts, into ``out`` if given."""
    if "linear" not in _state and not _load():
        raise RuntimeError(f"nmflow's N:M kernel is unavailable: {_state['error']}")
    if out is None:
        return torch.ops.nmflow_nm.densify(values, indices, n, m, bits)
    return torch.ops.nmflow_nm.densify_out(values, indices, n, m, bits, out=out)
