"""``NMLinear``: an inference layer that holds an N:M weight as its kept values and packed in-group positions.

It holds what the compressed checkpoint stores (see :mod:`nmflow.compressed`), in ``nn.Linear``'s layout
``[out, in]`` with groups of ``m`` along the input: ``values`` (a parameter, so ``model.to(dtype)`` and HF's
``model.dtype`` see it), ``indices`` (positions, ``ceil(log2 m)`` bits each, packed into uint8), ``zero_signs``
(only for a weight that had dropped ``-0.0`` entries, so that :meth:`to_dense_module` gives it back bitwise) and
``bias``; so a deployed layer takes the bytes its checkpoint takes. Only the order differs: the kernel reads
rows in blocks of 16 (kept entry j of 16 rows side by side; the last ``out % 16`` rows row by row, as in the
file), so ``values`` has shape ``[out, in/m*n]`` but this "row blocks" memory order; :meth:`file_parts` gives the
file's order back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nmflow import compressed
from nmflow.inference import dispatch, kernel
from nmflow.inference.backends import BACKENDS

__all__ = ["NMLinear", "is_conv1d"]

_VALUES, _INDICES, _SIGNS = compressed.VALUES, compressed.INDICES, compressed.SIGNS


def is_conv1d(module: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


class NMLinear(nn.Module):
    """``y = x W^T + b`` for an N:M ``W``; built by ``nmflow.deploy``, turned back by ``nmflow.undeploy``.

    ``backend`` is ``"auto"`` (measure and pick per dtype and batch-size bucket, see :mod:`nmflow.inference.dispatch`)
    or the name of a backend in :data:`nmflow.inference.backends.BACKENDS`. ``choices`` holds auto's decisions,
    ``{(dtype, device type, bucket): backend}``; set an entry to override one.
    """

    def __init__(
        self,
        parts: dict[str, torch.Tensor],
        info: dict,
        bias: torch.Tensor | None,
        *,
        source: type[nn.Module] = nn.Linear,
        requires_grad: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.n, self.m, self.bits = int(info["n"]), int(info["m"]), int(info["index_bits"])
        shape = info["shape"]  # the checkpoint's shape: [out, in] for a Linear, [in, out] for a Conv1D
        self.in_features, self.out_features = (shape[0], shape[1]) if info["dim"] == 0 else (shape[1], shape[0])
        kept = self.in_features // self.m * self.n
        values = _to_blocks(parts[_VALUES].reshape(self.out_features, kept))
        self.values = nn.Parameter(values, requires_grad=False)
        self.register_buffer("indices", parts[_INDICES])
        if self.out_features >= 16:  # else the two orders are the same
            positions = compressed.unpack_bits(parts[_INDICES], self.bits, values.numel())
            self.indices = compressed.pack_bits(_to_blocks(positions.reshape(values.shape)), self.bits)
        self.register_buffer("zero_signs", parts.get(_SIGNS))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.source, self.requires_grad, self.backend = source, requires_grad, backend
        self._dense_copies = False
        self.choices: dict[tuple[torch.dtype, str, int], str] = {}
        self._prepared: dict[str, Any] = {}

    @property
    def dense_copies(self) -> bool:
        """Whether ``auto`` may keep a dense copy of the weight where that is fastest (see dispatch)."""
        return self._dense_copies

    @dense_copies.setter
    def dense_copies(self, allowed: bool) -> None:
        if allowed != self._dense_copies:
            self.choices.clear()  # decided among other candidates
            self._prepared.pop("dense-cached", None)
        self._dense_copies = allowed

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the weight this layer computes with."""
        return (self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> NMLinear:
        self._prepared.clear()  # derived copies follow the parts' dtype and device; rebuild on next use
        return super()._apply(fn, recurse)

    def nbytes(self) -> int:
        """Bytes of the parameters and buffers (what the compressed checkpoint stores for this layer)."""
        tensors = [self.values, self.indices, self.zero_signs, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def prepared(self, backend: Any) -> Any:
        """The backend's derived tensors for this layer, built on first use."""
        if backend.name not in self._prepared:
            self._prepared[backend.name] = backend.prepare(self)
        return self._prepared[backend.name]

    # ------------------------------------------------------------------ the dense weight, when someone needs it
    def positions(self) -> torch.Tensor:
        """The in-group position of every kept value, int64 ``[out, in/m*n]``, rows in order."""
        positions = compressed.unpack_bits(self.indices, self.bits, self.values.numel())
        return _from_blocks(positions.reshape(self.values.shape))

    def file_parts(self) -> dict[str, torch.Tensor]:
        """The parts in the compressed file's order (values, packed indices, zero signs if any)."""
        parts = {
            _VALUES: _from_blocks(self.values.detach()).reshape(-1),
            _INDICES: compressed.pack_bits(self.positions(), self.bits),
        }
        return parts if self.zero_signs is None else {**parts, _SIGNS: self.zero_signs}

    def columns(self) -> torch.Tensor:
        """The input column of every kept value, int64 ``[out, in/m*n]``, rows in order."""
        kept = self.values.shape[1]
        return self.positions() + torch.arange(kept, device=self.values.device) // self.n * self.m

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight with ``+0.0`` where entries were dropped."""
        on_cpu = self.values.device.type == "cpu" and self.values.dtype in (
            torch.float32,
            torch.bfloat16,
            torch.float16,
        )
        if on_cpu and kernel.available():
            return kernel.densify(self.values, self.indices, self.n, self.m, self.bits)
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(1, self.columns(), _from_blocks(self.values.detach()))

    @torch.no_grad()
    def to_dense_module(self) -> nn.Module:
        """The ``nn.Linear`` / ``Conv1D`` this layer was made from, bitwise (dropped ``-0.0`` signs included)."""
        info = {"n": self.n, "m": self.m, "dim": 1, "shape": list(self.shape), "index_bits": self.bits}
        info |= {"dtype": str(self.values.dtype).removeprefix("torch."), "zero_signs": self.zero_signs is not None}
        weight = compressed.decode("weight", info, {_SIGNS: None, **self.file_parts()}, "NMLinear")
        conv1d = self.source is not nn.Linear
        with torch.device("meta"):
            if conv1d:
                module = self.source(self.out_features, self.in_features)
            else:
                module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        weight = weight.t().contiguous() if conv1d else weight
        module.weight = nn.Parameter(weight.to(self.values.device), requires_grad=self.requires_grad)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.requires_grad)
        return module

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"NMLinear: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        if x.dtype != self.values.dtype:
            raise RuntimeError(f"NMLinear: input is {x.dtype}, the layer's values are {self.values.dtype}")
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if rows.requires_grad and torch.is_grad_enabled():  # the kernels have no backward; F.linear does
            backend = BACKENDS["dense"]
        else:
            backend = dispatch.backend_for(self, rows)
        y = backend.forward(self, rows.contiguous(), self.prepared(backend))
        return y.reshape(*x.shape[:-1], self.out_features)


def _to_blocks(rows: torch.Tensor) -> torch.Tensor:
    """``[out, kept]`` rows in order -> the same shape in row-blocks memory order (see the module docstring)."""
    head = rows.shape[0] // 16 * 16
    blocks = rows[:head].reshape(-1, 16, rows.shape[1]).transpose(1, 2).reshape(head, rows.shape[1])
    return torch.cat([blocks, rows[head:]]) if head < rows.shape[0] else blocks.contiguous()


def _from_blocks(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`."""
    head = stored.shape[0] // 16 * 16
    rows = stored[:head].reshape(-1, stored.shape[1], 16).transpose(1, 2).reshape(head, stored.shape[1])
    return torch.cat([rows, stored[head:]]) if head < stored.shape[0] else rows.contiguous()
