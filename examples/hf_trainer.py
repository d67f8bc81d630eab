"""Train a tiny byte-level GPT-2 with the Hugging Face Trainer and an MDGF-exponential 1:16 recipe.

    python examples/hf_trainer.py [--steps 200] [--output-dir hf-trainer-run]

The model is randomly initialised from a config and reads the Python help topics that ship with
CPython (``pydoc_data.topics``) as bytes, so nothing is downloaded; it runs in under a minute on a CPU.
The callback sparsifies the model when training begins, steps the schedule after every optimizer step,
adds ``nmflow/*`` keys to the Trainer's logs and checkpoints, and finalizes the model when training ends.
"""

from __future__ import annotations

import argparse
from pydoc_data.topics import topics

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from nmflow import Recipe
from nmflow.integrations import NMSparsityCallback

CONTEXT = 64


def byte_blocks(count: int) -> list[dict]:
    """``count`` blocks of CONTEXT bytes of help text; byte values are the token ids (vocabulary 256)."""
    text = "\n".join(topics[name] for name in sorted(topics)).encode("utf-8")
    ids = torch.tensor(list(text[: count * CONTEXT]), dtype=torch.long).view(count, CONTEXT)
    return [{"input_ids": row, "labels": row} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (the recipe's total_steps)")
    parser.add_argument("--output-dir", default="hf-trainer-run", help="where the Trainer writes checkpoints")
    options = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=options.output_dir,
        use_cpu=True,
        report_to=[],
        max_steps=options.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=max(options.steps // 10, 1),
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = NMSparsityCallback(Recipe("mdgf-exp", {"ff": "1:16"}))
    trainer = Trainer(model=model, args=args, train_dataset=byte_blocks(256))
    callback.install(trainer)
    trainer.train()

    for entry in trainer.state.log_history:
        if "nmflow/D" in entry:
            print(
                f"step {entry['step']:4d}  loss {entry['loss']:.3f}  D {entry['nmflow/D']:.3f}  "
                f"ff density {entry['nmflow/density/ff']:.4f}  flip rate {entry['nmflow/flip_rate/ff']:.4f}  "
                f"Var|grad| {entry['nmflow/grad_abs_var/ff']:.2e}"
            )
    records = callback.sparsifier.verify()  # raises if any group holds more than N non-zeros
    kept = sum(r["kept"] for r in records)
    total = sum(r["total"] for r in records)
    print(f"exact N:M in {len(records)} tensors ({', '.join(sorted({r['realized'] for r in records}))}): ", end="")
    print(f"{kept}/{total} feed-forward weights kept")


if __name__ == "__main__":
    main()
