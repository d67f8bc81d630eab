"""Training-step time and extra memory of every nmflow recipe at 1:16 on a ViT's FF layers, against dense.

Targets: a sparse step costs at most 1.03x a dense one (the official PGF approach: about 1.05x), and
the extra memory is at most one copy of the sparsified weights plus 1 byte per weight.

Model: a Hugging Face ``ViTForImageClassification``, random init (seed 0 for every configuration):
hidden 256, 4 layers, 4 heads, MLP 1024 (4x), 32x32 images with 4x4 patches (64 patches + CLS =
65 tokens), batch 32, 10 classes. As in ViT-B, the FF layers (fc1, fc2) hold 2/3 of each block's
weights and most of its FLOPs. It is the smallest such model that still looks like a ViT: a dense
step takes about 0.4 s on 2 idle CPU cores (0.55 s of CPU time with one thread).

A step is forward + backward + AdamW step + ``sp.step()``. Every configuration is measured in the
sparse phase: no dense phase, no fine-tune, and a run far longer than the benchmark, so no phase
boundary is crossed. The SDGF recipes are measured twice: at the first pattern of their walk (step 0)
and at their last (a state loaded at a late step). ``official`` swaps the FF ``nn.Linear`` layers for
the re-creation of the official code's layer (official_baseline.py; bias kept).

Timing: configurations take turns round-robin (the order rotates every round), ``--steps`` steps
per turn, after one warm-up round that is discarded, so that drift of the machine hits them alike.
Reported: the median wall-clock ms per step and its ratio to dense's median; on CPU also the median
CPU time of the process per step, which other processes on a shared machine disturb far less
(with ``--threads 1`` it is the single thread's work). Figures from a shared machine are indicative.

Memory: the tensors autograd saves for backward during one forward (each storage counted once,
parameters excluded), sparse minus dense, per sparsified weight. ``--rss`` adds a coarse cross-check
(Linux): the peak RSS (VmHWM) of a fresh process running 3 steps of each configuration. VmHWM, not
``ru_maxrss``, which carries the parent's peak over into the child through fork and exec. At this
model size allocator noise (about +-10 B per weight) hides the few MB of difference.

    python benchmarks/bench_train_step.py                 # full run, several minutes
    python benchmarks/bench_train_step.py --threads 1     # on a busy machine: avoids OpenMP oversubscription
    python benchmarks/bench_train_step.py --quick         # smoke test, < 30 s
    python benchmarks/bench_train_step.py --rss           # also the peak RSS of each configuration
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from official_baseline import OfficialSparseLinear, _OfficialStepDecay, swap_linears
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import nmflow

PATTERN = nmflow.NMPattern(1, 16)
TOTAL_STEPS = 1_000_000  # far beyond the benchmark: the schedule stays inside the sparse phase
LATE_STEP = 990_000  # inside the last interval of every SDGF walk
SEED = 0
RECIPES = ("ste", "srste", "oneshot", "mdgf-linear", "mdgf-exp", "sdgf-stepwise", "sdgf-geometric")
BUDGET_BYTES_PER_WEIGHT = 4 + 1  # one fp32 copy of the sparsified weights + a 1-byte mask
TARGET_RATIO = 1.03
Batch = tuple[torch.Tensor, torch.Tensor]  # images, labels


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    batch: int


FULL_SIZE = ModelSize(hidden=256, layers=4, heads=4, batch=32)
QUICK_SIZE = ModelSize(hidden=64, layers=2, heads=2, batch=8)


@dataclass(frozen=True)
class Config:
    """``method``: "dense", "official" or an nmflow method; ``step``: where the sparsifier starts."""

    method: str
    step: int = 0


CONFIGS = (
    Config("dense"),
    Config("official"),
    *(Config(method) for method in RECIPES),
    Config("sdgf-stepwise", LATE_STEP),
    Config("sdgf-geometric", LATE_STEP),
)


@dataclass
class Trainee:
    """One configuration's model, optimizer and (for nmflow recipes) sparsifier."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsifier: nmflow.Sparsifier | None


@dataclass
class Samples:
    """Per-step times of one configuration: wall clock, and CPU time of this process (all its threads)."""

    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration per round (default 2)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15), after a warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 rounds of 2 steps: a smoke test")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in subprocesses (Linux)")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)  # internal: one RSS probe
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 2, 2
    return args


def build(config: Config, size: ModelSize, device: torch.device) -> Trainee:
    """The model of ``config``, initialised identically for every configuration."""
    torch.manual_seed(SEED)
    vit = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=4 * size.hidden,
        num_labels=10,
    )
    model = ViTForImageClassification(vit).to(device).train()
    sparsifier = None
    label = config.method
    if config.method == "official":
        swap_linears(model, ff_layer_names(model), PATTERN.n, PATTERN.m)
    elif config.method != "dense":
        recipe = nmflow.Recipe(config.method, {"ff": str(PATTERN)}, dense_steps=0, finetune_steps=0)
        sparsifier = nmflow.sparsify(model, recipe, total_steps=TOTAL_STEPS, verbose=False)
        if config.step:
            state = sparsifier.state_dict()
            state["step"] = config.step
            sparsifier.load_state_dict(state)
        if config.method.startswith("sdgf"):
            label += f" @{next(iter(sparsifier.status().patterns.values()))}"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Trainee(label, model, optimizer, sparsifier)


def ff_layer_names(model: nn.Module) -> list[str]:
    """The FF layers, as nmflow resolves them (method "dense" plans targets but attaches nothing)."""
    planner = nmflow.sparsify(model, nmflow.Recipe("dense", {"ff": str(PATTERN)}), total_steps=1, verbose=False)
    return [t.name for t in planner.targets]


def sparsified_weight_count(model: nn.Module) -> int:
    return sum(model.get_submodule(name).weight.numel() for name in ff_layer_names(model))


def make_batch(size: ModelSize, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(size.batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (size.batch,), generator=generator)
    return images.to(device), labels.to(device)


def train_step(trainee: Trainee, images: torch.Tensor, labels: torch.Tensor) -> None:
    loss = trainee.model(pixel_values=images, labels=labels).loss
    loss.backward()
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    if trainee.sparsifier is not None:
        trainee.sparsifier.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainees: list[Trainee], batch: Batch, steps: int, rounds: int, device: torch.device) -> list[Samples]:
    """Round-robin over the trainees, ``steps`` steps per turn; round 0 (warm-up) is dropped."""
    samples = [Samples() for _ in trainees]
    for round_index in range(rounds + 1):
        shift = round_index % len(trainees)
        for i in list(range(shift, len(trainees))) + list(range(shift)):
            for _ in range(steps):
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                train_step(trainees[i], *batch)
                synchronize(device)
                if round_index:
                    samples[i].wall_ms.append((time.perf_counter() - wall) * 1e3)
                    samples[i].cpu_ms.append((time.process_time() - cpu) * 1e3)
        if round_index % 5 == 0 or round_index == rounds:
            print(f"  round {round_index}/{rounds}{' (warm-up)' if not round_index else ''} done", flush=True)
    return samples


def sparsity_work(trainee: Trainee) -> None:
    """The work a sparse step adds to a dense one, alone: every sparsified weight's forward and backward
    (mask, W_eff, gradient rule) plus ``sp.step()``. Far less noisy than the difference of two step times."""
    if trainee.sparsifier is not None:
        for target in trainee.sparsifier.targets:
            weight = getattr(target.module, target.param_name)  # runs the parametrization
            weight.backward(torch.ones_like(weight))
        trainee.sparsifier.step()
    else:
        for layer in trainee.model.modules():
            if isinstance(layer, OfficialSparseLinear):
                _OfficialStepDecay.apply(layer.weight, layer.n, layer.m).backward(torch.ones_like(layer.weight))
    trainee.model.zero_grad(set_to_none=True)


def time_sparsity_work(trainees: list[Trainee], repeats: int, device: torch.device) -> list[float]:
    """Median wall ms of `sparsity_work` per trainee, round-robin; the dense trainee (first) is skipped."""
    samples: list[list[float]] = [[] for _ in trainees]
    for _ in range(repeats + 1):
        for i, trainee in enumerate(trainees[1:], start=1):
            synchronize(device)
            start = time.perf_counter()
            sparsity_work(trainee)
            synchronize(device)
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [0.0] + [statistics.median(sample[1:]) for sample in samples[1:]]


def bytes_saved_for_backward(trainee: Trainee, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the non-parameter storages autograd keeps for backward during one forward pass."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in trainee.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = trainee.model(pixel_values=images, labels=labels).loss
    del loss  # the graph, and with it every saved tensor, is freed here
    return sum(saved.values())


def peak_rss_mb(index: int, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a fresh process that builds configuration ``index`` and trains it for 3 steps."""
    command = [sys.executable, __file__, "--rss-child", str(index), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def rss_child(index: int, size: ModelSize, device: torch.device) -> None:
    trainee = build(CONFIGS[index], size, device)
    batch = make_batch(size, device)
    for _ in range(3):
        train_step(trainee, *batch)
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(peak_kib / 1024)


def print_times(trainees: list[Trainee], samples: list[Samples], work_ms: list[float], device: torch.device) -> None:
    with_cpu = device.type == "cpu"
    header = f"{'config':22} {'wall ms/step':>12} {'x dense':>8}"
    header += f" {'cpu ms/step':>12} {'x dense':>8}" if with_cpu else ""
    header += f" {'added work ms':>13} {'1 + work/dense':>14}"
    print("\n" + header + "\n" + "-" * len(header))
    dense_wall, dense_cpu = statistics.median(samples[0].wall_ms), statistics.median(samples[0].cpu_ms)
    for trainee, sample, work in zip(trainees, samples, work_ms):
        wall, cpu = statistics.median(sample.wall_ms), statistics.median(sample.cpu_ms)
        row = f"{trainee.label:22} {wall:12.1f} {wall / dense_wall:8.3f}"
        row += f" {cpu:12.1f} {cpu / dense_cpu:8.3f}" if with_cpu else ""
        row += f" {work:13.2f} {1 + work / dense_wall:14.3f}"
        print(row)


def print_memory(trainees: list[Trainee], batch: Batch, weights: int, rss: list[float]) -> None:
    header = f"{'config':22} {'saved MB':>9} {'extra B/weight':>15} {'budget':>7}"
    header += f" {'peak RSS MB':>12} {'RSS +B/weight':>14}" if rss else ""
    print("\n" + header + "\n" + "-" * len(header))
    dense_saved = bytes_saved_for_backward(trainees[0], *batch)
    for i, trainee in enumerate(trainees):
        saved = bytes_saved_for_backward(trainee, *batch)
        budget = "-" if i == 0 else str(BUDGET_BYTES_PER_WEIGHT)
        row = f"{trainee.label:22} {saved / 2**20:9.1f} {(saved - dense_saved) / weights:15.2f} {budget:>7}"
        if i < len(rss):
            row += f" {rss[i]:12.1f} {(rss[i] - rss[0]) * 2**20 / weights:14.2f}"
        print(row)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = QUICK_SIZE if args.quick else FULL_SIZE
    if args.rss_child is not None:
        rss_child(args.rss_child, size, device)
        return

    trainees = [build(config, size, device) for config in CONFIGS]
    batch = make_batch(size, device)
    weights = sparsified_weight_count(trainees[0].model)
    print(
        f"ViT hidden {size.hidden}, {size.layers} layers, MLP {4 * size.hidden}, 65 tokens, batch {size.batch}; "
        f"{PATTERN} on the FF layers ({weights:,} weights); device {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"timing: {args.rounds} rounds x {args.steps} steps per configuration, after a warm-up round")
    samples = time_steps(trainees, batch, args.steps, args.rounds, device)
    work_ms = time_sparsity_work(trainees, 5 if args.quick else 50, device)
    print_times(trainees, samples, work_ms, device)
    print(
        f"target: sparse step <= {TARGET_RATIO}x dense. 'added work' times the sparse part of a step alone "
        "(masks, W_eff, gradient rule, sp.step) and relates it to dense's median step"
    )

    measure_rss = args.rss and sys.platform == "linux"
    rss = [peak_rss_mb(i, args) for i in range(2 if args.quick else len(CONFIGS))] if measure_rss else []
    print_memory(trainees, batch, weights, rss)
    print(
        f"target: extra memory <= {BUDGET_BYTES_PER_WEIGHT} B per sparsified weight "
        "(4 for one fp32 copy + 1 for a bool mask)\nTimings from a shared machine are indicative."
    )


if __name__ == "__main__":
    main()
