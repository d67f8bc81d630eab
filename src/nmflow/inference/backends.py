"""How an :class:`~nmflow.inference.NMLinear` computes ``x W^T + b``: the backend interface and its registry.

A backend says whether it can run a layer for an input (device, dtype), may prepare derived tensors once (a CSR
copy, a semi-structured copy; cached on the layer until its dtype or device changes) and computes the output.
Callers only go through :data:`BACKENDS`, so a new backend (a Triton kernel, say) is one class and one
:func:`register_backend` call: ``deploy(backend=...)``, ``auto`` and the per-layer overrides pick it up.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from nmflow import compressed
from nmflow.core.errors import ConfigError
from nmflow.inference import kernel

if TYPE_CHECKING:
    from nmflow.inference.nmlinear import NMLinear

__all__ = ["BACKENDS", "Backend", "register_backend"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Backend:
    """One way of running an N:M layer. Subclasses set ``name`` and override the three methods."""

    name = ""
    extra_memory = False  # True when prepare() keeps more than the compressed parts (auto then weighs it)

    def unavailable(self, layer: NMLinear, x: torch.Tensor) -> str | None:
        """Why this backend cannot run ``layer`` on ``x``; None when it can."""
        raise NotImplementedError

    def prepare(self, layer: NMLinear) -> Any:
        """Derived tensors this backend keeps for ``layer`` (built once, dropped on ``.to()``); None if none."""
        return None

    def forward(self, layer: NMLinear, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        """``x [B, in] @ W.T + bias`` as ``[B, out]`` in ``x``'s dtype."""
        raise NotImplementedError


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available under ``backend.name`` (replacing one of the same name)."""
    if not backend.name or backend.name == "auto":
        raise ConfigError(f"a backend needs a name other than 'auto', got {backend.name!r}")
    BACKENDS[backend.name] = backend
    return backend


def _cpu_kernel_reason(layer: NMLinear, x: torch.Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"runs on CPU, the input is on {x.device}"
    if layer.values.dtype not in _KERNEL_DTYPES:
        return f"dtype {layer.values.dtype} (float32, bfloat16, float16 only)"
    return kernel.unavailable_reason()


class NMKernel(Backend):
    """nmflow's C++ kernel on the compressed parts themselves: no extra memory."""

    name = "nm"

    def unavailable(self, layer: NMLinear, x: torch.Tensor) -> str | None:
        return _cpu_kernel_reason(layer, x)

    def forward(self, layer: NMLinear, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        return kernel.linear(x, layer.values, layer.indices, layer.bias, layer.n, layer.m, layer.bits)


class CSR(Backend):
    """torch's CSR sparse matmul (MKL on CPU): float32/float64 only, 12 bytes per kept weight."""

    name = "csr"
    extra_memory = True

    def unavailable(self, layer: NMLinear, x: torch.Tensor) -> str | None:
        if layer.values.dtype not in (torch.float32, torch.float64):
            return f"torch's CSR matmul takes float32/float64 on CPU, not {layer.values.dtype}"
        return None

    def prepare(self, layer: NMLinear) -> torch.Tensor:
        columns = layer.columns()
        rows = torch.arange(0, columns.numel() + 1, columns.shape[1], device=columns.device)
        values = layer.file_parts()[compressed.VALUES]
        with warnings.catch_warnings():  # "CSR support is in beta": said on every build, nothing to act on
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(rows, columns.reshape(-1), values, layer.shape, check_invariants=False)

    def forward(self, layer: NMLinear, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        y = (prepared @ x.t()).t()
        return y if layer.bias is None else y + layer.bias


class DenseRebuild(Backend):
    """Dense GEMM on a weight rebuilt for each call, for large batches.

    On CPU the kernel rebuilds it into one scratch buffer per thread and dtype, shared by all layers (the size of
    the largest layer that ran this way): fresh memory for each call would cost a page fault per 4 KB page.
    """

    name = "dense"

    def __init__(self) -> None:
        self._scratch = threading.local()

    def unavailable(self, layer: NMLinear, x: torch.Tensor) -> str | None:
        return None

    def forward(self, layer: NMLinear, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        values = layer.values
        if values.device.type != "cpu" or values.dtype not in _KERNEL_DTYPES or not kernel.available():
            return F.linear(x, layer.dense_weight(), layer.bias)
        buffers = self._scratch.__dict__
        numel = layer.out_features * layer.in_features
        if buffers.get(values.dtype) is None or buffers[values.dtype].numel() < numel:
            buffers[values.dtype] = torch.empty(numel, dtype=values.dtype)
        weight = buffers[values.dtype][:numel].view(layer.shape)
        kernel.densify(values, layer.indices, layer.n, layer.m, layer.bits, out=weight)
        return F.linear(x, weight, layer.bias)


class DenseCached(Backend):
    """Dense GEMM on a dense copy kept next to the compressed parts: dense speed at dense memory."""

    name = "dense-cached"
    extra_memory = True

    def unavailable(self, layer: NMLinear, x: torch.Tensor) -> str | None:
        return None

    def prepare(self, layer: NMLinear) -> torch.Tensor:
        return layer.dense_weight()

    def forward(self, layer: NMLinear, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return F.linear(x, prepared, layer.bias)


class SemiStructured(Backend):
    """NVIDIA's 2:4 sparse tensor cores (``torch.sparse.to_sparse_semi_structured``), for 2:4-valid layers."""

    name = "semi-structured"

    def unavailable(self, layer: NMLinear, x: torch.Tensor) -> str | None:
        from nmflow import semi_structured

        if x.device.type != "cuda":
            return "needs a CUDA GPU"
        if layer.values.dtype not in semi_structured.SUPPORTED_DTYPES:
            return f"dtype {layer.values.dtype} (float16/bfloat16 only)"
        out_features, in_features = layer.shape
        if out_features % semi_structured.MIN_ROWS or in_features % semi_structured.MIN_COLS:
            return f"shape {layer.shape} is not a multiple of ({semi_structured.MIN_ROWS}, {semi_structured.MIN_COLS})"
        if not (layer.n <= 2 and layer.m % 4 == 0):
            return f"{layer.n}:{layer.m} is not 2:4-valid"
        return None

    def prepare(self, layer: NMLinear) -> torch.Tensor:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(layer.dense_weight())

    def forward(self, layer: NMLinear, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return F.linear(x, prepared, layer.bias)


for _backend in (NMKernel(), CSR(), DenseRebuild(), DenseCached(), SemiStructured()):
    register_backend(_backend)
del _backend
