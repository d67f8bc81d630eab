"""Integrations of nmflow with training frameworks (each imports its framework only when used)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["NMSparsityCallback"]

if TYPE_CHECKING:
    from nmflow.integrations.hf_trainer import NMSparsityCallback


def __getattr__(name: str) -> Any:
    # transformers is an optional dependency: import it only when its integration is asked for
    if name == "NMSparsityCallback":
        from nmflow.integrations.hf_trainer import NMSparsityCallback

        return NMSparsityCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
