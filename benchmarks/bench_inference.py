"""How fast a deployed N:M layer / model runs next to dense, on CPU (``nmflow.deploy``).

(a) Layer level: LLaMA-7B shapes ([out, in] 4096x4096, 11008x4096, 4096x11008), N:M weights along the input,
several copies of each layer cycled so that the weights come from memory and not from the 32 MB cache, as in a
real model. Per row: dense ``F.linear`` on a dense copy, then each backend (``nm`` kernel, ``csr``, ``dense``:
the weight rebuilt per call) and ``auto``, median ms over round-robin runs, with the speed-up over dense and the
byte limit (dense bytes / the N:M layer's bytes: values + ceil(log2 M)-bit indices), which is what batch-1 decoding
(memory-bound) could reach.

(b) End to end: a LLaMA-shaped model from a config (hidden 2048, FF 5632, 8 layers, 16 heads, vocabulary 16384;
random weights), FF at 1:16 and the attention projections at 1:8 (finalized by nmflow), bf16: greedy decoding at
batch 1, tokens/s dense vs deployed, the time of a 512-token prefill, and the deployed logits against dense.

    python benchmarks/bench_inference.py                       # everything (about 20 min on 2 cores)
    python benchmarks/bench_inference.py --quick               # smoke test: one small shape, batch 1 and 8
    python benchmarks/bench_inference.py --part layer --batches 1 --dtypes bf16 --shapes 11008x4096
    python benchmarks/bench_inference.py --part e2e --new-tokens 32
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import nmflow
from nmflow.compressed import index_bits, pack_bits
from nmflow.inference import BACKENDS, NMLinear, kernel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = ("4096x4096", "11008x4096", "4096x11008")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("layer", "e2e", "all"), default="all")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="OUTxIN layer shapes")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:8", "1:16", "1:32"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 512])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["nm", "csr", "dense", "auto"],
        help="backends to time (and auto; auto-copies: auto with deploy(dense_copies=True))",
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per row (median)")
    parser.add_argument("--sweep", type=int, default=8, help="most consecutive calls (on successive copies) per timing")
    parser.add_argument("--cache-mb", type=int, default=96, help="cycle copies until they exceed this many MB")
    parser.add_argument("--new-tokens", type=int, default=64, help="e2e: greedy tokens generated")
    parser.add_argument("--prefill", type=int, default=512, help="e2e: prompt length of the prefill timing")
    parser.add_argument("--layers", type=int, default=8, help="e2e: decoder layers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="a smoke test in well under a minute")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batches, args.repeats, args.cache_mb, args.sweep = ["1024x1024"], [1, 8], 3, 16, 2
        args.new_tokens, args.prefill, args.layers = 8, 64, 1
    return args


def median_ms(
    candidates: dict[str, Callable[[int], object]], copies: int, repeats: int, sweep: int
) -> dict[str, float]:
    """Median ms per call over ``repeats`` rounds. In a round each candidate in turn makes up to ``sweep``
    consecutive calls (fewer once 20 ms are spent) on successive copies of the weights, as a model runs its layers
    one after another: a single call timed right after another candidate's would also pay for the caches that
    call left full of its data."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    used = dict.fromkeys(candidates, 0)  # copies used so far, per candidate
    for run in candidates.values():
        run(0)
    for _ in range(repeats):
        for name, run in candidates.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or (calls < sweep and time.perf_counter() - start < 0.02):
                used[name] += 1
                run(used[name] % copies)
                calls += 1
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {name: statistics.median(samples) for name, samples in times.items()}


def byte_limit(n: int, m: int, itemsize: int) -> float:
    """Dense bytes per weight over N:M bytes per weight (values + packed indices)."""
    return itemsize / (n / m * (itemsize + index_bits(m) / 8))


def layer_copies(shape: tuple[int, int], n: int, m: int, dtype: torch.dtype, cache_mb: int) -> list[NMLinear]:
    """N:M layers (random kept values and positions), enough copies that their bytes exceed ``cache_mb``."""
    out_features, in_features = shape
    kept = in_features // m * n
    per_copy = out_features * kept * (dtype.itemsize + index_bits(m) / 8)
    copies = []
    for seed in range(max(2, int(cache_mb * 2**20 / per_copy) + 1)):
        gen = torch.Generator().manual_seed(seed)
        positions = torch.rand(out_features * kept // n, m, generator=gen).argsort(-1)[:, :n].sort(-1).values
        parts = {
            "::nm.values": torch.randn(out_features * kept, generator=gen).to(dtype),
            "::nm.indices": pack_bits(positions.reshape(-1), index_bits(m)),
        }
        info = {"n": n, "m": m, "dim": 1, "shape": [out_features, in_features], "index_bits": index_bits(m)}
        copies.append(NMLinear(parts, info, None))
    return copies


def layer_rows(args: argparse.Namespace) -> None:
    names = [b for b in args.backends if b in ("auto", "auto-copies") or b in BACKENDS]
    print(
        f"\n(a) layers: ms per call (x dense), median of {args.repeats} rounds of up to {args.sweep} consecutive "
        f"calls; weights cycled over > {args.cache_mb} MB"
    )
    print("| shape | dtype | N:M | batch | dense F.linear ms | " + " | ".join(names) + " | byte limit |")
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|")
    for shape_text in args.shapes:
        shape = tuple(int(s) for s in shape_text.split("x"))
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            dense_copies = max(2, int(args.cache_mb * 2**20 / (shape[0] * shape[1] * dtype.itemsize)) + 1)
            dense = [torch.randn(shape, dtype=dtype) for _ in range(dense_copies)]
            for pattern in args.patterns:
                n, m = (int(v) for v in pattern.split(":"))
                layers = layer_copies(shape, n, m, dtype, args.cache_mb)
                # auto-copies runs its own copies: switching dense_copies on a layer resets its decisions
                with_copies = [copy.deepcopy(layer) for layer in layers] if "auto-copies" in names else []
                for batch in args.batches:
                    x = torch.randn(batch, shape[1], dtype=dtype)
                    runs = {"F.linear": lambda c, x=x, dense=dense: F.linear(x, dense[c % len(dense)])}
                    for name in names:
                        runs[name] = _runner(with_copies if name == "auto-copies" else layers, name, x)
                    runs = {k: v for k, v in runs.items() if v is not None}
                    with torch.inference_mode():
                        ms = median_ms(runs, len(layers), args.repeats, args.sweep)
                    cells = [
                        f"{ms[name]:.2f} ({ms['F.linear'] / ms[name]:.2f}x)" if name in ms else "-" for name in names
                    ]
                    limit = byte_limit(n, m, dtype.itemsize)
                    print(
                        f"| {shape_text} | {dtype_name} | {pattern} | {batch} | {ms['F.linear']:.2f} | "
                        + " | ".join(cells)
                        + f" | {limit:.1f}x |",
                        flush=True,
                    )


def _runner(layers: list[NMLinear], name: str, x: torch.Tensor) -> Callable[[int], object] | None:
    """A callable running copy c of the layer with backend ``name`` (``auto-copies``: auto with
    ``dense_copies=True``), or None if that backend cannot run it."""
    if name not in ("auto", "auto-copies") and BACKENDS[name].unavailable(layers[0], x) is not None:
        return None

    def run(c: int) -> object:
        layer = layers[c % len(layers)]
        layer.backend, layer.dense_copies = name.removesuffix("-copies"), name == "auto-copies"
        return layer(x)

    return run


def e2e(args: argparse.Namespace) -> None:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=16384,
        max_position_embeddings=max(2048, args.prefill + args.new_tokens),
    )
    if args.quick:
        config.hidden_size, config.intermediate_size, config.vocab_size = 256, 704, 2048
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    recipe = nmflow.Recipe("oneshot", sparsity={"ff": "1:16", "qkv": "1:8", "attn_out": "1:8"})
    nmflow.sparsify(model, recipe, total_steps=10, verbose=False).finalize()
    model.to(torch.bfloat16)  # bf16 weights; the fp32 reference below uses these same values
    prompt = torch.randint(0, config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    short = prompt[:, :16]

    def measure() -> tuple[float, float, torch.Tensor]:
        with torch.inference_mode():
            model.generate(short, max_new_tokens=2, do_sample=False)  # warm-up (and auto's batch-1 choices)
            start = time.perf_counter()
            out = model.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            tokens_per_s = (out.shape[1] - short.shape[1]) / (time.perf_counter() - start)
            model(prompt)  # warm-up of the prefill batch size
            start = time.perf_counter()
            logits = model(prompt).logits
            return tokens_per_s, time.perf_counter() - start, logits

    with torch.inference_mode():  # the same bf16 weights in fp32: what both bf16 runs round away from
        reference = model.float()(prompt).logits
    model.to(torch.bfloat16)
    dense_tps, dense_prefill, dense_logits = measure()
    with tempfile.TemporaryDirectory() as folder:
        nmflow.save_compressed(model, os.path.join(folder, "m.safetensors"))
        checkpoint_bytes = sum(
            t.numel() * t.element_size()
            for t in nmflow.compressed.read_compressed(os.path.join(folder, "m.safetensors"))[1].values()
        )
    table = nmflow.deploy(model, verbose=False)
    sparse_tps, sparse_prefill, sparse_logits = measure()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    nm_bytes = sum(t.numel() * t.element_size() for t in tensors)
    print(
        f"\n(b) LLaMA-shaped model: hidden {config.hidden_size}, FF {config.intermediate_size}, {args.layers} layers,"
    )
    print(
        f"vocab {config.vocab_size}, bf16; {len(table)} N:M layers deployed; parameters + buffers {nm_bytes:,} bytes "
        f"= {nm_bytes / checkpoint_bytes:.3f}x the compressed checkpoint's tensors"
    )
    print(f"| model | decode tokens/s (batch 1) | x dense | prefill of {args.prefill} tokens, s | x dense |")
    print("|---|---|---|---|---|")
    print(f"| dense | {dense_tps:.2f} | 1.00 | {dense_prefill:.3f} | 1.00 |")
    print(
        f"| deployed | {sparse_tps:.2f} | {sparse_tps / dense_tps:.2f} | {sparse_prefill:.3f} | "
        f"{dense_prefill / sparse_prefill:.2f} |"
    )
    same_argmax = (sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()
    for name, logits in (("dense", dense_logits), ("deployed", sparse_logits)):
        print(f"logits, {name} bf16 vs the fp32 computation: max |difference| {_max_diff(logits, reference):.4g}")
    print(
        f"max |deployed - dense| {_max_diff(sparse_logits, dense_logits):.4g} (largest |logit| "
        f"{reference.abs().max():.3g}); same argmax at {same_argmax:.1%} of {args.prefill} positions"
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, nmflow kernel: "
        f"{kernel.isa() if kernel.available() else kernel.unavailable_reason()}"
    )
    if args.part in ("layer", "all"):
        layer_rows(args)
    if args.part in ("e2e", "all"):
        e2e(args)


if __name__ == "__main__":
    main()
