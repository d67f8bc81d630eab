"""The config of `nmflow train`: one validated dataclass whose fields are the keys of config files and the flags.

Config files are YAML read as YAML 1.2 (`read_config_file`); a run's own ``config.yaml`` holds every key with the
value it used (`TrainConfig.resolved`) and can be given back to ``--config`` or continued with ``--resume``.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from nmflow import __version__
from nmflow.app.tasks import TASKS
from nmflow.core.errors import ConfigError, is_whole_number
from nmflow.core.recipes import (
    DEFAULT_DECAY_FRACTION,
    DEFAULT_DENSE_FRACTION,
    DEFAULT_FINETUNE_FRACTION,
    METHODS,
    Recipe,
)

__all__ = [
    "RECIPE_OPTIONS",
    "RESUME_OVERRIDES",
    "TrainConfig",
    "config_from_file",
    "read_config_file",
    "resume_config",
    "write_yaml",
]

SEED_LIMIT = 2**32  # scikit-learn's random_state takes seeds below 2**32


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field whose help text is also the CLI help, so the two cannot drift apart."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _recipe_default(name: str) -> Any:
    """The default of a `Recipe` field, for help texts that must not repeat it."""
    default = next(f.default for f in fields(Recipe) if f.name == name)
    return None if default is MISSING else default


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on, validated on construction. The fields are the keys of config files."""

    task: str = _option("vision", "what to train: vision (ViT, images) or language (GPT-2, bytes)", choices=TASKS)
    data: str | None = _option(
        None,
        "your own data: vision, an image folder or .npz file; language, a text file or a folder of them "
        "(default: scikit-learn's digits / CPython's pydoc text)",
        metavar="PATH",
    )
    model: dict[str, Any] = _option({}, "overrides of the task's HF model config, e.g. {'hidden_size': 128}", cli=False)
    block_size: int = _option(128, "language: context length in bytes", metavar="N")
    image_size: int | None = _option(None, "vision: resize your own images to this square size", metavar="N")
    init_from: str | None = _option(
        None, "start from the weights of a finished run (its folder) of the same task, e.g. a dense one", metavar="DIR"
    )
    diagnostics: bool = _option(True, "log gradient-noise, second-moment and mask-flip statistics with the loss")
    method: str = _option("mdgf-exp", "training method", choices=METHODS)
    sparsity: dict[str, str] = _option({"ff": "1:16"}, "target pattern per role, e.g. {'ff': '1:16', 'qk': '1:8'}")
    steps: int = _option(1000, "optimizer steps", metavar="N")
    seed: int = _option(0, "seed of the model initialization and of the batch order", metavar="N")
    data_seed: int = _option(
        0, "seed of the train/validation/test split, independent of the training seed", metavar="N"
    )
    out: str | None = _option(None, "output folder (default: runs/<method>-<date>-<time>)", metavar="DIR")
    device: str = _option("cpu", "torch device, e.g. cpu or cuda")
    threads: int = _option(1, "CPU threads of torch: this model is too small to gain from more", metavar="N")
    batch_size: int = _option(64, "training batch size", metavar="N")
    lr: float = _option(1e-3, "peak learning rate of AdamW")
    warmup_fraction: float = _option(0.05, "fraction of the steps that warm the learning rate up linearly", metavar="F")
    weight_decay: float = _option(
        0.05, "AdamW weight decay of matrices and embeddings, not biases or norms", metavar="X"
    )
    grad_clip: float = _option(1.0, "clip the gradient norm to this value (0: no clipping)", metavar="X")
    eval_every: int = _option(100, "evaluate on the validation split every N steps", metavar="N")
    log_every: int = _option(10, "write a metrics line every N steps", metavar="N")
    save_every: int = _option(200, "save a checkpoint every N steps, and at the last step", metavar="N")
    keep_checkpoints: int = _option(2, "keep the newest K checkpoints, delete older ones", metavar="K")
    tensorboard: bool | None = _option(
        None, "write TensorBoard scalars to <out>/tensorboard (default: when tensorboard is installed)"
    )
    # The recipe's options, passed on to nmflow.Recipe; None keeps the recipe's default.
    dense_fraction: float | None = _option(
        None, f"fraction of the steps trained dense first (default: {DEFAULT_DENSE_FRACTION:.0%})", metavar="F"
    )
    dense_steps: int | None = _option(None, "length of the dense phase in steps, instead of a fraction", metavar="N")
    finetune_fraction: float | None = _option(
        None, f"fraction of the steps fine-tuned at the target (default: {DEFAULT_FINETUNE_FRACTION:.0%})", metavar="F"
    )
    finetune_steps: int | None = _option(
        None, "length of the fine-tuning phase in steps, instead of a fraction", metavar="N"
    )
    beta: float | None = _option(
        None, "MDGF decay rate per step (default: the one that ends the decay on time)", metavar="X"
    )
    decay_fraction: float | None = _option(
        None,
        f"MDGF: fraction of the steps the decay takes after the dense phase (default: {DEFAULT_DECAY_FRACTION})",
        metavar="F",
    )
    decay_end_fraction: float | None = _option(
        None, "MDGF: fraction of the steps where the decay ends, instead of decay_fraction", metavar="F"
    )
    decay_end_value: float | None = _option(
        None, f"MDGF-exp: D at the end of the decay (default: {_recipe_default('decay_end_value')})", metavar="X"
    )
    srste_lambda: float | None = _option(
        None, f"SR-STE decay of the pruned weights (default: {_recipe_default('srste_lambda')})", metavar="X"
    )
    geometric_k: int | None = _option(
        None,
        f"SDGF-geometric first block multiplier, a power of two (default: {_recipe_default('geometric_k')})",
        metavar="K",
    )
    patterns: str | list[str] | dict[str, list[str]] | None = _option(
        None, "pattern walk: 'stepwise', 'geometric', a list of 'N:M' or a mapping role -> list", cli=False
    )
    skip_indivisible: bool = _option(False, "leave layers dense whose input size M does not divide, instead of failing")
    exclude: list[str] | None = _option(
        None, "regexes (re.fullmatch) of module names to leave dense, e.g. ['.*layers\\.0\\..*']"
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ConfigError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        positive = ("steps", "threads", "batch_size", "eval_every", "log_every", "save_every", "keep_checkpoints")
        for name in (*positive, "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) < SEED_LIMIT:
                raise ConfigError(f"{name} must be within [0, 2**32), got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be within [0, 1), got {self.warmup_fraction!r}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {self.image_size!r}")
        if self.out is not None and not self.out.strip():
            raise ConfigError("out must name a folder, got an empty string")
        _check_device(self.device)
        recipe = self.recipe()
        recipe.phase_plan(self.steps)
        recipe.resolved_beta(self.steps)  # raises if the decay cannot end after the dense phase

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from plain data (a config file plus flags); unknown keys are an error, not ignored."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
        return cls(**data)

    def recipe(self) -> Recipe:
        options = {name: getattr(self, name) for name in RECIPE_OPTIONS if getattr(self, name) is not None}
        return Recipe(self.method, self.sparsity, **options)

    def resolved(self, out: Path) -> dict[str, Any]:
        """What ``config.yaml`` holds: every key with the value used, the recipe's defaults spelled out.

        ``exclude`` only when it excludes something, so the configs of runs that exclude nothing read as those of
        the versions before it (resuming and grouping in reports compare configs key by key).
        """
        recipe = {k: v for k, v in self.recipe().to_dict().items() if k in (*RECIPE_OPTIONS, "sparsity")}
        resolved = {"nmflow_version": __version__, **asdict(replace(self, out=str(out), **recipe))}
        if not resolved["exclude"]:
            del resolved["exclude"]
        return resolved


_RECIPE_ONLY = {f.name for f in fields(Recipe)} - {"method", "sparsity"}
RECIPE_OPTIONS = tuple(f.name for f in fields(TrainConfig) if f.name in _RECIPE_ONLY)
"""The config keys passed on to `nmflow.Recipe` as they are."""


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return is_whole_number(value, minimum=None)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null"}
    return names.get(hint) or {dict: "a mapping", list: "a list"}[typing.get_origin(hint)]


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
        if device.type != "cpu":
            torch.empty(0, device=device)  # fails now, not after the data is loaded, if the device is absent
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"device {name!r} cannot be used: {err}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, unchecked: `TrainConfig.from_dict` checks the keys and values.

    Numbers follow YAML 1.2, as people write them: ``1e-3`` is a number (PyYAML alone reads text) and
    ``1:16`` is text (PyYAML alone reads the base-60 number 76). A ``nmflow_version`` key, written into
    every ``config.yaml``, is dropped, so a run's config file can be given back to ``--config``.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start} is damaged or binary)") from None
    try:
        data = yaml.load(text, Loader=_yaml12_loader())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    data.pop("nmflow_version", None)
    return data


def config_from_file(path: str | Path, flags: Mapping[str, Any]) -> TrainConfig:
    """The config of ``nmflow train --config path``: the file's keys, overridden by ``flags``, checked together.

    An error the file takes part in (an unknown key, a bad value, a combination with a flag) names the file, so
    that people know what to edit; an error the flags raise on their own does not, as it would point at the
    wrong culprit.
    """
    values = read_config_file(path)  # its own errors name the file already
    try:
        return TrainConfig.from_dict({**values, **flags})
    except ConfigError as err:
        if _raises_alone(flags, str(err)):
            raise
        raise ConfigError(f"config file {path}: {err}") from None


def _raises_alone(flags: Mapping[str, Any], message: str) -> bool:
    """Whether ``flags`` without any config file raise ``message``."""
    try:
        TrainConfig.from_dict(flags)
    except ConfigError as err:
        return str(err) == message
    return False


def _yaml12_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    numeric = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regex) for tag, regex in resolvers if tag not in numeric]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return Loader


RESUME_OVERRIDES = ("save_every", "keep_checkpoints", "tensorboard")
"""Config keys ``--resume`` may change: they decide what is written, not what is computed."""


def resume_config(out: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config of the run in ``out``, read from its ``config.yaml``, for `train` with ``resume=True``.

    ``overrides`` may only hold `RESUME_OVERRIDES`: any other change would make the run another one.
    """
    overrides = dict(overrides or {})
    refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if refused:
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_OVERRIDES)
        raise ConfigError(
            f"--resume continues the run as its config.yaml says; {', '.join(refused)} would change it "
            f"(allowed with --resume: {allowed}, --no-tensorboard)"
        )
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume {out}: it holds no config.yaml; give the output folder of a run")
    return config_from_file(path, {**overrides, "out": str(out)})


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
