"""``backend="auto"``: per layer shape and pattern, dtype, device and batch-size bucket, the fastest backend.

The first call in a bucket times each candidate (a few runs, median) on the layer's own parts and a random input
of the bucket's size, and the answer is cached twice: on the layer (``NMLinear.choices``, which the user may edit)
and in a table shared by every layer of the same shape, pattern and dtype (:data:`DECISIONS`), so a 32-layer
model measures each distinct layer once. ``deploy`` measures batch 1 (decoding) for every layer up front; larger
buckets are measured when the first such batch arrives (a prefill, say), which costs that call a few runs.

Candidates are the registered backends that can run the layer, except those that keep extra memory (a CSR or
a dense copy) while the N:M kernel is available: the dense candidate rebuilds the weight for each call, and its
measured time includes that rebuild, so it wins only where dense GEMM is faster even so (large batches at low
sparsity), and the deployed model never holds more than its compressed bytes. ``deploy(dense_copies=True)`` adds
the kept dense copy as a candidate: where it wins (no case on the AVX-512 CPU of docs/benchmarks.md; perhaps 2:4
on a CPU with AVX2 only) the layer then holds its dense weight too, built at the first such batch.
Without the kernel (not built) CSR (float32) or a kept dense copy (other dtypes) are the candidates, as the
fallback in ``deploy`` says.
"""

from __future__ import annotations

import bisect
import statistics
import time
from typing import TYPE_CHECKING

import torch

from nmflow.inference import kernel
from nmflow.inference.backends import BACKENDS, Backend

if TYPE_CHECKING:
    from nmflow.inference.nmlinear import NMLinear

__all__ = ["BUCKETS", "DECISIONS", "backend_for", "bucket", "choose", "measure"]

BUCKETS = (1, 4, 16, 64, 256, 512)  # a batch of B rows is timed as the largest bucket <= B
DECISIONS: dict[tuple, str] = {}
_RUNS, _BUDGET_S = 5, 0.3  # timed runs per candidate: at most this many, stopping once the budget is spent


def bucket(rows: int) -> int:
    """The bucket of a batch of ``rows`` input rows (tokens times sequences)."""
    return BUCKETS[bisect.bisect_right(BUCKETS, max(rows, 1)) - 1]


def candidates(layer: NMLinear, x: torch.Tensor) -> list[Backend]:
    """The backends auto weighs for ``layer`` on inputs like ``x`` (see the module's docstring)."""
    usable = [b for b in BACKENDS.values() if b.unavailable(layer, x) is None]
    names = {b.name for b in usable}
    if x.device.type == "cpu" and "nm" not in names:  # the fallback: no kernel
        return [BACKENDS["csr" if "csr" in names else "dense-cached"]]
    lean = [b for b in usable if not b.extra_memory and (x.device.type == "cpu" or b.name != "dense")]
    if layer.dense_copies and x.device.type == "cpu":
        lean.append(BACKENDS["dense-cached"])
    return lean or [BACKENDS["dense-cached"]]


def measure(layer: NMLinear, backend: Backend, x: torch.Tensor) -> float:
    """Median seconds of ``backend`` on ``layer`` for input ``x`` (one warm-up run first)."""
    prepared = layer.prepared(backend)
    times: list[float] = []
    spent = 0.0
    with torch.no_grad():
        backend.forward(layer, x, prepared)
        while len(times) < _RUNS and (spent < _BUDGET_S or len(times) < 2):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            backend.forward(layer, x, prepared)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
            spent += times[-1]
    return statistics.median(times)


def choose(layer: NMLinear, x: torch.Tensor) -> str:
    """Time every candidate on ``x`` and return the fastest; drops the losers' derived copies."""
    options = candidates(layer, x)
    if len(options) == 1:
        return options[0].name
    timed = {b.name: measure(layer, b, x) for b in options}
    best = min(timed, key=timed.__getitem__)
    for name in timed:
        if name != best:
            layer._prepared.pop(name, None)
    return best


def backend_for(layer: NMLinear, rows: torch.Tensor) -> Backend:
    """The backend that runs ``layer`` on ``rows`` ([B, in]): the forced one, or auto's cached or new choice."""
    if layer.backend != "auto":
        return BACKENDS[layer.backend]
    size = bucket(rows.shape[0])
    key = (rows.dtype, rows.device.type, size)
    name = layer.choices.get(key)
    if name is None:
        shared = (*layer.shape, layer.n, layer.m, layer.bias is not None, *key, kernel.available(), layer.dense_copies)
        name = DECISIONS.get(shared)
        if name is None:
            probe = torch.randn(size, layer.in_features, dtype=rows.dtype, device=rows.device)
            name = DECISIONS[shared] = choose(layer, probe)
        layer.choices[key] = name
    return BACKENDS[name]
