"""nmflow: N:M structured-sparse training with progressive gradient flow (arXiv 2402.04744)."""

from nmflow.compressed import load_compressed, save_compressed
from nmflow.errors import ConfigError, FinalizedError, NmflowError, NoMatchingTargetError, NonFiniteWeightError
from nmflow.masks import NMPattern, is_nm, nm_mask, realized_n
from nmflow.recipes import METHODS, ROLES, Recipe
from nmflow.schedules import Phase
from nmflow.sparsifier import Sparsifier, SparsityStatus, sparsify

__version__ = "0.2.0"

__all__ = [
    "METHODS",
    "ROLES",
    "ConfigError",
    "FinalizedError",
    "NMPattern",
    "NmflowError",
    "NoMatchingTargetError",
    "NonFiniteWeightError",
    "Phase",
    "Recipe",
    "Sparsifier",
    "SparsityStatus",
    "__version__",
    "is_nm",
    "load_compressed",
    "nm_mask",
    "realized_n",
    "save_compressed",
    "sparsify",
]
