"""The tasks `nmflow train` and `nmflow sweep` run: a model built from a config, its data, its loss and its score.

* ``vision``: an HF ViT, randomly initialized, classifying images: the 8x8 digits bundled with scikit-learn by
  default, or the user's own ``.npz`` file or image folder (``data``).
* ``language``: an HF GPT-2 decoder, randomly initialized, trained as a byte-level language model: the English
  text of CPython's ``pydoc_data`` by default, or the user's own text files (``data``). Scored by validation loss
  and perplexity.

Both keep their whole data on the device (these datasets are small) and draw every training batch from one
generator, so a resumed run replays the batch order from the seed. A task's model is its default config with
the run's ``model`` overrides applied, e.g. ``{"hidden_size": 128, "num_hidden_layers": 4}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nmflow.app.data import ImageSplits, Split, TextSplits, batch_indices, random_windows, text_windows
from nmflow.core.errors import ConfigError

__all__ = ["GPT2_CONFIG", "TASKS", "VIT_CONFIG", "LanguageTask", "Task", "VisionTask", "build_task"]

VIT_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 256,
}
"""The vision model: a 3-layer ViT of width 64; the image size, channels and labels come from the data."""

GPT2_CONFIG = {
    "n_embd": 128,
    "n_layer": 2,
    "n_head": 4,
    "resid_pdrop": 0.0,  # no dropout: short runs, and seed-to-seed spread that comes from the recipe only
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": None,  # GPT-2's 50256 is no byte
    "eos_token_id": None,
}
"""The language model: a 2-layer GPT-2 of width 128 over 256 byte values; the context length is ``block_size``."""

Batch = dict[str, torch.Tensor]  # the model's keyword inputs, plus "labels"


class Task(Protocol):
    """What the training loop needs of a task."""

    name: str
    metric: str  # the score reported besides the loss: "accuracy" (higher is better) or "perplexity" (lower)

    def build_model(self) -> nn.Module: ...
    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]: ...
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...
    def example_inputs(self) -> dict[str, torch.Tensor]: ...
    def describe(self) -> str: ...


def build_task(
    name: str,
    *,
    data: str | None,
    data_seed: int,
    model: Mapping[str, Any],
    device: torch.device,
    block_size: int,
    image_size: int | None,
) -> Task:
    """Load the data of task ``name`` onto ``device`` and check the model overrides; errors name the culprit."""
    from nmflow.app import data as loaders

    if name == "vision":
        if data is None:
            if image_size is not None:
                raise ConfigError("image_size resizes your own images (data); the bundled digits are 8x8")
            images = loaders.load_digits_splits(data_seed)
        else:
            images = loaders.load_image_splits(data, data_seed, image_size=image_size)
        return VisionTask(images, dict(model), device)
    if name == "language":
        return LanguageTask(loaders.load_text_splits(data, data_seed), dict(model), device, block_size)
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


def _config_with(config_class: type, defaults: Mapping[str, Any], overrides: Mapping[str, Any], task: str) -> Any:
    """An HF config of the defaults with ``overrides``, refusing keys the config class does not have
    (HF configs would keep them silently as unused attributes)."""
    known = config_class().to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(
            f"model overrides {', '.join(map(repr, unknown))} are not {config_class.__name__} keys "
            f"(task {task}; e.g. {', '.join(sorted(defaults))})"
        )
    try:
        return config_class(**{**defaults, **overrides})
    except (ValueError, TypeError) as err:
        message = f"model overrides {dict(overrides)} do not make a valid {config_class.__name__}: {err}"
        raise ConfigError(message) from None


@dataclass
class VisionTask:
    data: ImageSplits
    overrides: dict[str, Any]
    device: torch.device
    name: str = "vision"
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        from transformers import ViTConfig

        size = self.data.image_size
        patch = 2 if size <= 16 else 4 if size <= 64 else 16
        labels = dict(enumerate(self.data.class_names))
        defaults = {
            **VIT_CONFIG,
            "image_size": size,
            "patch_size": patch if size % patch == 0 else 1,
            "num_channels": self.data.num_channels,
            "num_labels": len(labels),
            "id2label": labels,
            "label2id": {label: i for i, label in labels.items()},
        }
        self.config = _config_with(ViTConfig, defaults, self.overrides, self.name)
        self.splits = {name: getattr(self.data, name).to(self.device) for name in ("train", "val", "test")}

    def build_model(self) -> nn.Module:
        from transformers import ViTForImageClassification

        return ViTForImageClassification(self.config).to(self.device)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        train = self.splits["train"]
        for indices in batch_indices(len(train), batch_size, generator):
            indices = indices.to(self.device)
            yield {"pixel_values": train.images[indices], "labels": train.labels[indices]}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Mean cross-entropy and accuracy on ``split``, in eval mode; leaves the model in train mode."""
        data: Split = self.splits[split]
        model.eval()
        loss_sum, correct = 0.0, 0
        size = 1024
        for start in range(0, len(data), size):
            images, labels = data.images[start : start + size], data.labels[start : start + size]
            logits = model(pixel_values=images).logits
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
        model.train()
        return {"loss": loss_sum / len(data), "accuracy": correct / len(data), "examples": len(data)}

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.splits["train"].images[:1]}

    def describe(self) -> str:
        return f"{len(self.splits['test'])} held-out images of {self.data.source}"


@dataclass
class LanguageTask:
    data: TextSplits
    overrides: dict[str, Any]
    device: torch.device
    block_size: int
    name: str = "language"
    metric: str = "perplexity"

    def __post_init__(self) -> None:
        from transformers import GPT2Config

        defaults = {**GPT2_CONFIG, "vocab_size": self.data.vocab_size, "n_positions": self.block_size}
        self.config = _config_with(GPT2Config, defaults, self.overrides, self.name)
        if self.config.n_positions < self.block_size:
            raise ConfigError(f"n_positions {self.config.n_positions} is shorter than block_size {self.block_size}")
        self.splits = {name: getattr(self.data, name).to(self.device) for name in ("train", "val", "test")}
        self.eval_windows = {split: text_windows(self.splits[split], self.block_size) for split in ("val", "test")}

    def build_model(self) -> nn.Module:
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel(self.config).to(self.device)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        while True:
            windows = random_windows(self.splits["train"], self.block_size, batch_size, generator).to(self.device)
            yield {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Mean next-byte cross-entropy (nats) over every window of ``split``, and its perplexity."""
        windows = self.eval_windows[split]
        model.eval()
        loss_sum = 0.0
        for start in range(0, len(windows), 256):
            chunk = windows[start : start + 256]
            logits = model(input_ids=chunk[:, :-1]).logits
            loss_sum += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        model.train()
        loss = loss_sum / windows[:, 1:].numel()
        return {"loss": loss, "perplexity": math.exp(loss), "examples": windows[:, 1:].numel()}

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.eval_windows["val"][:1, :-1]}

    def describe(self) -> str:
        return f"{self.eval_windows['test'][:, 1:].numel():,} held-out bytes of {self.data.source}"


TASKS = ("vision", "language")
