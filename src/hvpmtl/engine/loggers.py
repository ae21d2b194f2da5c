"""Optional experiment trackers beside ``metrics.csv``: TensorBoard (default), Weights & Biases and
MLflow, chosen by ``train.loggers``. Each is imported only when chosen and only on rank 0; a
missing one is reported with the extra that installs it (``pip install 'hvpmtl[wandb]'``).

A tracker receives every ``metrics.csv`` column but ``step`` (finite values only, as
``train/<column>`` at that step) and the resolved config once. The run's tracker ids are kept in
``<run>/trackers.json`` so that a resumed run continues the same W&B / MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

from hvpmtl.engine.config import LOGGERS

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # logger -> its module
IDS_FILE = "trackers.json"
MAX_PARAM = 500  # MLflow's longest parameter value
PARAMS_PER_CALL = 100  # MLflow's most parameters per request


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    if sys.modules.get(module) is not None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_loggers(names: tuple[str, ...] | list[str], key: str = "train.loggers") -> None:
    """Raise ``ValueError`` naming ``key`` for an unknown logger or one whose package is not
    installed (without importing it)."""
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"{key}: unknown logger '{name}' (choose from {', '.join(LOGGERS)})")
        module = EXTRAS[name]
        if not _installed(module):
            how = f"pip install 'hvpmtl[{name}]'" if name in TRACKERS else f"pip install {module}"
            raise ValueError(f"{key}: '{name}' needs the {module} package: {how}")


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": "0.0001"}`` (values cut to MLflow's limit)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:MAX_PARAM]
    return out


def _scalars(row: dict) -> dict[str, float]:
    return {f"train/{k}": float(v) for k, v in row.items() if k != "step" and math.isfinite(v)}


class Tracker:
    """One destination of the rows: ``log(rows)``, ``close()``."""

    def log(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WandbTracker(Tracker):
    """A W&B run (``train.wandb``): the config at start, each row at its step."""

    def __init__(self, cfg: Any, run_dir: Path, config: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=cfg.project or None, entity=cfg.entity or None, name=cfg.run_name or run_dir.name,
            dir=str(run_dir), config=config, id=run_id, resume="allow" if run_id else None,
            mode=cfg.mode or None, tags=list(cfg.tags) or None,
        )  # fmt: skip
        self.id = str(self.run.id)

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            self.run.log(_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class MLflowTracker(Tracker):
    """An MLflow run (``train.mlflow``): the config as parameters and ``config.json``, each row's
    values at its step."""

    def __init__(self, cfg: Any, run_dir: Path, config: dict, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        if cfg.tracking_uri:
            mlflow.set_tracking_uri(cfg.tracking_uri)
        if not run_id:
            mlflow.set_experiment(cfg.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (cfg.run_name or run_dir.name))
        self.id = str(run.info.run_id)
        if not run_id:  # MLflow refuses to log a parameter twice
            params = list(_flat(config).items())
            for i in range(0, len(params), PARAMS_PER_CALL):
                mlflow.log_params(dict(params[i : i + PARAMS_PER_CALL]))
            mlflow.log_dict(config, "config.json")

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            self.mlflow.log_metrics(_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"wandb": WandbTracker, "mlflow": MLflowTracker}


def open_trackers(names, settings: Any, run_dir: str | Path, config: dict | None) -> list[Tracker]:
    """Start the W&B / MLflow runs ``names`` chooses (``settings`` holds their ``wandb`` and
    ``mlflow`` blocks), continuing the ones recorded in ``<run_dir>/trackers.json``."""
    chosen = [n for n in names if n in TRACKERS]
    if not chosen:
        return []
    check_loggers(chosen)
    run_dir = Path(run_dir)
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    trackers = [TRACKERS[n](getattr(settings, n), run_dir, config or {}, ids.get(n)) for n in chosen]
    new = {**ids, **{n: t.id for n, t in zip(chosen, trackers)}}
    if new != ids:
        from hvpmtl.engine.checkpoint import atomic_write

        text = json.dumps(new, indent=1).encode()
        atomic_write(ids_path, lambda f: f.write(text))
    return trackers
