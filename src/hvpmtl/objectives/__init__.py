"""The pre-training objectives, one file each (config, head, loss, :class:`Objective`).

Importing this package registers the paper's four in their order (MLC, SwAV, MIM, MD); an
objective of one's own is one more module using :func:`register_objective`.
"""

from __future__ import annotations

import importlib

from hvpmtl.objectives.base import (
    Objective,
    RoutingConfig,
    Step,
    TasksConfig,
    ViewPlan,
    objective_types,
    register_objective,
    unregister_objective,
)

__all__ = [
    "Objective", "RoutingConfig", "Step", "TasksConfig", "ViewPlan", "objective_types", "register_objective",
    "unregister_objective",
]  # fmt: skip

BUILT_IN = ("mlc", "swav", "mim", "distill")  # registration order = build, config and logging order
for _module in BUILT_IN:
    importlib.import_module(f"hvpmtl.objectives.{_module}")
