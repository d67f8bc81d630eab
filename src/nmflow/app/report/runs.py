"""Reading run folders: what each run asked for (``config.yaml``), got (``summary.json``) or hit (``failed.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nmflow.core.errors import ConfigError
from nmflow.core.masks import NMPattern

SKIPPED_FOLDERS = {"checkpoints", "tensorboard"}


@dataclass(frozen=True)
class RunRecord:
    """One run folder as found on disk."""

    path: Path
    status: str  # "finished" | "failed" | "incomplete"
    config: dict[str, Any]
    summary: dict[str, Any] | None = None
    error: str | None = None
    returncode: int | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the summary, else of the config: the summary holds what the run actually used."""
        if self.summary is not None and key in self.summary:
            return self.summary[key]
        return self.config.get(key, default)

    @property
    def method(self) -> str:
        return str(self.get("method", "?"))

    @property
    def is_pretraining(self) -> bool:
        """The dense first stage of `nmflow sweep`'s fine-tune protocol: an input to other runs, not a result."""
        return self.path.parent.name == "pretrain"

    @property
    def sparsity(self) -> dict[str, NMPattern]:
        """Role -> pattern, sorted by role; empty for dense runs, whose sparsity setting has no effect."""
        if self.method == "dense":
            return {}
        try:
            return {role: NMPattern.parse(value) for role, value in sorted(dict(self.get("sparsity") or {}).items())}
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"run {self.path}: unusable sparsity {self.get('sparsity')!r} ({err})") from None


def collect_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every run folder below ``runs_dir`` (itself included), sorted by path."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"runs folder {root} does not exist or is not a folder")
    folders = {
        file.parent
        for marker in ("config.yaml", "run.yaml", "failed.json")
        for file in root.rglob(marker)
        if not SKIPPED_FOLDERS.intersection(file.relative_to(root).parts[:-1])
    }
    return [_read_run(folder) for folder in sorted(folders)]


def _read_run(folder: Path) -> RunRecord:
    config: dict[str, Any] = {}
    try:
        config = _read_mapping(folder / "config.yaml", yaml.safe_load) or {}
        config = config or _read_mapping(folder / "run.yaml", yaml.safe_load) or {}  # what nmflow sweep asked for
        summary = _read_mapping(folder / "summary.json", json.loads)
        failure = _read_mapping(folder / "failed.json", json.loads)
    except ValueError as err:  # a file cut off mid-write, or not a mapping: the run did not finish cleanly
        return RunRecord(folder, "failed", config, error=f"unreadable {err}")
    if summary is not None:
        return RunRecord(folder, "finished", config, summary)
    if failure is not None:
        return RunRecord(
            folder, "failed", config, error=str(failure.get("error", "")), returncode=failure.get("returncode")
        )
    return RunRecord(folder, "incomplete", config)


def _read_mapping(path: Path, parse: Callable[[str], Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path.name}: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path.name}: holds {type(data).__name__}, not a mapping")
    return data


def read_metrics(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and evaluation lines of ``metrics.jsonl``; a line cut off by a crash is skipped."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    path = folder / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            (evals if "val_loss" in record else train).append(record)
    return train, evals
