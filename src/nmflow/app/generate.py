"""``nmflow generate RUN_DIR --prompt TEXT``: text from a finalized language model, dense and deployed, timed.

RUN_DIR is the output folder of an ``nmflow train --task language`` run (byte-level: one token per byte) or any
Hugging Face causal LM folder with its tokenizer. The model is loaded, generates greedily once dense, is deployed
with ``nmflow.deploy`` and generates again; the command prints the deployed model's text and both speeds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from nmflow.core.errors import ConfigError

__all__ = ["add_arguments", "generate"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(command: argparse.ArgumentParser) -> None:
    """The command's flags (the parser itself is made by nmflow.app.cli)."""
    command.add_argument("run_dir", metavar="RUN_DIR", help="a language run's output folder, or an HF causal LM folder")
    command.add_argument("--prompt", required=True, help="the text to continue")
    command.add_argument("--max-new-tokens", type=int, default=64, metavar="K", help="tokens to generate (default 64)")
    command.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and compute (default fp32)")
    command.add_argument("--backend", default="auto", help="nmflow.deploy backend (default auto)")
    command.add_argument("--verbose", action="store_true", help="also print deploy's per-layer table")
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    generate(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})
    return 0


class _Bytes:
    """The tokenizer of nmflow's language task: one token per byte of UTF-8."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _load(run_dir: Path) -> tuple[Any, Any]:
    """The model (eval mode) and a tokenizer with ``encode``/``decode``."""
    import transformers

    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir}: no config.json here; give a finished run's folder or an HF model folder")
    task_config = run_dir / "config.yaml"
    if task_config.is_file():  # an nmflow run
        import yaml

        task = (yaml.safe_load(task_config.read_text()) or {}).get("task", "vision")
        if task != "language":
            raise ConfigError(f"{run_dir} is a {task!r} run; nmflow generate needs a language model")
        tokenizer = _Bytes()
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{run_dir}: no tokenizer could be loaded ({err})") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(run_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{run_dir}: not a causal language model ({err})") from None
    return model.eval(), tokenizer


def _timed_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and tokens/s (after one short warm-up run, so auto's measurements are not counted)."""
    options = dict(do_sample=False, pad_token_id=0, min_new_tokens=new_tokens)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, **{**options, "min_new_tokens": 2})
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **options)
        seconds = time.perf_counter() - start
    return out[0, ids.shape[1] :], new_tokens / seconds


def generate(
    run_dir: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 64,
    dtype: str = "fp32",
    backend: str = "auto",
    verbose: bool = False,
) -> dict[str, Any]:
    """Generate from ``prompt`` dense and deployed; prints the text and the speeds, returns them."""
    import nmflow

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    model, tokenizer = _load(Path(run_dir))
    model.to(DTYPES[dtype])
    ids = torch.tensor([tokenizer.encode(prompt)])
    if ids.numel() == 0:
        raise ConfigError("--prompt is empty")
    dense_tokens, dense_speed = _timed_generate(model, ids, max_new_tokens)
    table = nmflow.deploy(model, backend=backend, verbose=verbose)
    tokens, speed = _timed_generate(model, ids, max_new_tokens)
    text = tokenizer.decode(tokens.tolist())
    same = torch.equal(tokens, dense_tokens)
    print(prompt + text)
    print(f"\n{len(table)} N:M layers deployed ({dtype}, {torch.get_num_threads()} threads), {max_new_tokens} tokens:")
    print(f"  dense     {dense_speed:8.1f} tokens/s")
    print(f"  deployed  {speed:8.1f} tokens/s  ({speed / dense_speed:.2f}x)")
    print(f"  tokens    {'identical to' if same else 'differ from'} the dense model's")
    return {"text": text, "dense_tokens_per_s": dense_speed, "tokens_per_s": speed, "same_tokens": same}
