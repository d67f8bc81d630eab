"""Cost of nmflow's training diagnostics (gradient noise, Adam second moment, flip rate) relative to a step.

The default task of ``nmflow train`` (3-layer ViT of width 64 on the 8x8 digits, batch 64, mdgf-exp at 1:16 on
the FF layers, in its sparse phase) and the default language task (2-layer GPT-2 of width 128, batch 16 x 128
bytes). Three ways to run a step take turns round-robin, blocks of 10 steps per turn after a discarded warm-up
round: without diagnostics; with them on every step (one mask computation per step: the previous step's "after"
masks are reused); with them on one step in ten, as ``log_every=10`` does (two mask computations per logged
step). Reported: the median over blocks of the CPU time of the process per step (one thread; CPU time, which
other processes on a shared machine disturb less than wall time), and the ratio to the plain step.

    python benchmarks/bench_diagnostics.py            # about a minute
    python benchmarks/bench_diagnostics.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nmflow
from nmflow.app.tasks import build_task
from nmflow.diagnostics import StepDiagnostics

MODES = ("off", "every step", "1 in 10")


def _setup(task_name: str, batch_size: int):
    task = build_task(
        task_name, data=None, data_seed=0, model={}, device=torch.device("cpu"), block_size=128, image_size=None
    )
    torch.manual_seed(0)
    model = task.build_model()
    recipe = nmflow.Recipe("mdgf-exp", {"ff": "1:16"}, dense_steps=0, finetune_steps=0)
    sp = nmflow.sparsify(model, recipe, total_steps=100_000, verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = task.train_batches(batch_size, torch.Generator().manual_seed(0))
    return task, model, sp, optimizer, batches, StepDiagnostics(sp, optimizer)


def _step(task, model, sp, optimizer, batches, diag, measure: bool) -> None:
    task.loss(model, next(batches)).backward()
    if measure:
        diag.after_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sp.step()
    if measure:
        diag.after_step()


def bench(task_name: str, batch_size: int, blocks: int, rounds: int) -> dict[str, float]:
    """Median CPU seconds per step of each mode; a sample is a block of 10 consecutive steps."""
    parts = _setup(task_name, batch_size)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(rounds + 1):
        order = MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]
        for mode in order:
            for _ in range(blocks):
                start = time.process_time()
                for i in range(10):
                    _step(*parts, measure=mode == "every step" or (mode == "1 in 10" and i == 0))
                if round_:  # round 0 warms up
                    samples[mode].append((time.process_time() - start) / 10)
    return {mode: statistics.median(values) for mode, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="blocks of 10 steps per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.rounds = 1, 1
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.blocks * 10} steps per mode")
    print("| task | step, no diagnostics (ms) | every step | 1 step in 10 |")
    print("|---|---|---|---|")
    for task_name, batch_size in (("vision", 64), ("language", 16)):
        result = bench(task_name, batch_size, args.blocks, args.rounds)
        base = result["off"]
        cells = [f"{result[m] * 1e3:.1f} ms ({result[m] / base:.3f}x)" for m in MODES[1:]]
        print(f"| {task_name} | {base * 1e3:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
