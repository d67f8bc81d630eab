"""Tiny models, an independent N:M count and multi-process launching shared by the family, compile and DDP tests."""

import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


class TimmStyleAttention(nn.Module):
    """timm's layout: Q, K, V packed as row blocks of one Linear ``qkv`` [3 * dim, dim]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class TimmStyleMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmStyleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmStyleAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TimmStyleMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class TimmStyleViT(nn.Module):
    """A timm-like ViT: ``patch_embed.proj``, ``blocks.N.attn.{qkv,proj}``, ``blocks.N.mlp.{fc1,fc2}``, ``head``."""

    def __init__(self, dim: int = 16, depth: int = 2, heads: int = 2, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(3, dim, patch=4)
        self.blocks = nn.ModuleList(TimmStyleBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def nonzeros_per_group(tensor: torch.Tensor, m: int, in_dim: int) -> torch.Tensor:
    """Non-zero count of every run of ``m`` consecutive entries along ``in_dim`` (independent of nmflow)."""
    moved = tensor.detach().movedim(in_dim, -1)
    assert moved.shape[-1] % m == 0, f"size {moved.shape[-1]} is not a multiple of {m}"
    return (moved.reshape(-1, m) != 0).sum(dim=-1)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``nmflow <args>`` run in process."""
    from nmflow.app.cli import main

    try:
        status = main(args)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def write_compressed(path, tensors: dict, header: dict) -> None:
    """Write a compressed checkpoint of format version 2 by hand: the checksums computed here, not by nmflow.

    ``header`` is the nmflow header without ``"stored"``; the tests use it to write doctored files that reach
    the structural checks behind the checksums.
    """
    import json
    import zlib

    import safetensors.torch

    def crc(tensor: torch.Tensor) -> int:
        return zlib.crc32(bytes(tensor.reshape(-1).view(torch.uint8).tolist()))

    stored = {
        key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "crc32": crc(t)}
        for key, t in tensors.items()
    }
    text = json.dumps({**header, "stored": stored})
    metadata = {"nmflow": text, "nmflow.crc32": str(zlib.crc32(text.encode()))}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank0_outcome(worker: Callable, args: tuple, out_dir: Path, processes: int = 2) -> str:
    """Spawn ``worker(rank, *args)`` and return what rank 0 wrote to ``out_dir/rank0.txt``; fails if it hangs."""
    context = mp.start_processes(worker, args=args, nprocs=processes, join=False)
    try:
        context.processes[0].join(timeout=120)  # far beyond the tests' 5 s timeouts: only a hang gets this far
        assert context.processes[0].exitcode == 0, f"rank 0 hung or crashed (exit code {context.processes[0].exitcode})"
    finally:
        for process in context.processes:
            process.kill()
    return (Path(out_dir) / "rank0.txt").read_text()
