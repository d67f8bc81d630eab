"""nmflow: N:M structured-sparse training with progressive gradient flow (arXiv 2402.04744).

Layout: `nmflow.core` (masks, recipes, schedules, targets, the sparsifier; torch only), the library tools beside
it (`flops`, `diagnostics`, `compressed`, `semi_structured`, `integrations`, `inference`), and `nmflow.app`, the
`nmflow` command (needs the `train` extra).
"""

import importlib
import sys

from nmflow.compressed import load_compressed, save_compressed
from nmflow.core.errors import (
    CheckpointError,
    ConfigError,
    FinalizedError,
    NmflowError,
    NoMatchingTargetError,
    NonFiniteWeightError,
)
from nmflow.core.masks import NMPattern, is_nm, nm_mask, realized_n
from nmflow.core.plan import Plan, plan
from nmflow.core.recipes import METHODS, ROLES, Recipe
from nmflow.core.schedules import Phase
from nmflow.core.sparsifier import Sparsifier, SparsityStatus, sparsify
from nmflow.inference import NMLinear, deploy, undeploy

__version__ = "0.2.0"

# The module paths of nmflow 0.2 (`nmflow.masks`, `nmflow.sparsifier`, ...) stay importable for one release.
for _name in ("errors", "masks", "parametrization", "recipes", "schedules", "sparsifier", "targets"):
    sys.modules[f"{__name__}.{_name}"] = globals()[_name] = importlib.import_module(f"{__name__}.core.{_name}")
del _name

__all__ = [
    "METHODS",
    "ROLES",
    "CheckpointError",
    "ConfigError",
    "FinalizedError",
    "NMLinear",
    "NMPattern",
    "NmflowError",
    "NoMatchingTargetError",
    "NonFiniteWeightError",
    "Phase",
    "Plan",
    "Recipe",
    "Sparsifier",
    "SparsityStatus",
    "__version__",
    "deploy",
    "is_nm",
    "load_compressed",
    "nm_mask",
    "plan",
    "realized_n",
    "save_compressed",
    "sparsify",
    "undeploy",
]
