"""What the checksums of a compressed checkpoint cost on load, against the time to read the file.

Target (issue 13): checking a ~1 GB file costs well under reading it. The file is a stack of transformer-like
layers, fp32: dense attention weights (4 x hidden^2, stored as is) and a 1:16 feed-forward pair (hidden x 4
hidden, stored compressed), enough layers to reach ``--gb``. Timed, medians over ``--repeats`` rounds:

* ``read, cold``:  safetensors maps the file and every stored tensor is copied out of it once (what
                   ``load_state_dict`` does), after the file is dropped from the page cache
                   (``posix_fadvise(DONTNEED)``; a VM's host may still cache it, so this is a lower bound);
* ``read, warm``:  the same with the file in the page cache;
* ``CRC-32 check``: what ``read_compressed`` adds: CRC-32 of every stored tensor already in memory, on a thread
                   pool (on a cold file the check is what pages the file in, so it moves the read, not adds one);
* ``CRC-32, 1 thread``, ``SHA-256, 1 thread``, ``BLAKE2b, 1 thread``: the digests one could have picked;
* ``read_compressed`` and ``load_compressed``: everything, warm (the latter also unpacks and scatters).

    python benchmarks/bench_checkpoint_check.py            # ~1 GB in a temporary folder
    python benchmarks/bench_checkpoint_check.py --quick    # ~64 MB, one round
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable

import torch

import nmflow
from nmflow.compressed import _describe, read_compressed
from nmflow.core.checksums import crc32_of


def build_state(gigabytes: float, hidden: int) -> dict[str, torch.Tensor]:
    """Layers of dense attention (stored as is) and a 1:16 FF pair (stored compressed) up to ``gigabytes``."""
    per_layer = 4 * hidden * hidden * 4 + 2 * (4 * hidden * hidden // 16) * (4 + 0.5)  # stored bytes
    state, gen = {}, torch.Generator().manual_seed(0)
    for layer in range(max(1, round(gigabytes * 2**30 / per_layer))):
        for name in ("q", "k", "v", "out"):
            state[f"h.{layer}.attn.{name}.weight"] = torch.randn(hidden, hidden, generator=gen)
        for name, shape in (("fc1", (4 * hidden, hidden)), ("fc2", (hidden, 4 * hidden))):
            weight = torch.randn(shape, generator=gen)
            mask = nmflow.nm_mask(weight, 1, 16, dim=1)
            state[f"h.{layer}.mlp.{name}.weight"] = weight.masked_fill(~mask, 0.0)  # +0.0, as finalize() writes
    return state


def read_stored(path: str) -> dict[str, torch.Tensor]:
    """Every stored tensor, copied out of the file's memory map (safetensors maps; the copy does the reading)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as reader:
        return {key: reader.get_tensor(key).clone() for key in reader.keys()}  # noqa: SIM118


def drop_from_page_cache(path: str) -> None:
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def digest_all(stored: dict[str, torch.Tensor], digest: Callable[[memoryview], object]) -> None:
    for tensor in stored.values():
        digest(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))


def median_seconds(run: Callable[[], object], repeats: int, before: Callable[[], None] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="approximate file size in GiB (default 1)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the layers (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row (default 3)")
    parser.add_argument("--quick", action="store_true", help="~64 MB, one round")
    args = parser.parse_args()
    if args.quick:
        args.gb, args.hidden, args.repeats = 1 / 16, 1024, 1

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model-nm.safetensors")
        state = build_state(args.gb, args.hidden)
        chosen = nmflow.save_compressed(state, path, layouts={name: 1 for name in state if ".mlp." in name})
        del state
        size = os.path.getsize(path)
        stored = read_stored(path)
        rows = {
            "read, cold": median_seconds(lambda: read_stored(path), args.repeats, lambda: drop_from_page_cache(path)),
            "read, warm": median_seconds(lambda: read_stored(path), args.repeats),
            "CRC-32 check": median_seconds(lambda: _describe(stored), args.repeats),
            "CRC-32, 1 thread": median_seconds(lambda: [crc32_of(t) for t in stored.values()], args.repeats),
            "SHA-256, 1 thread": median_seconds(lambda: digest_all(stored, hashlib.sha256), args.repeats),
            "BLAKE2b, 1 thread": median_seconds(lambda: digest_all(stored, hashlib.blake2b), args.repeats),
            "read_compressed": median_seconds(lambda: read_compressed(path), args.repeats),
            "load_compressed": median_seconds(lambda: nmflow.load_compressed(path), args.repeats),
        }
    print(f"file: {size / 2**30:.2f} GiB, {len(stored)} stored tensors ({len(chosen)} compressed at 1:16)")
    print(f"threads: torch {torch.get_num_threads()}, CPUs {os.cpu_count()}; zlib {zlib.ZLIB_RUNTIME_VERSION}")
    print(f"{'':<20}{'seconds':>9}{'GiB/s':>8}{'x warm read':>13}")
    for label, seconds in rows.items():
        print(f"{label:<20}{seconds:>9.3f}{size / 2**30 / seconds:>8.2f}{seconds / rows['read, warm']:>13.2f}")


if __name__ == "__main__":
    main()
