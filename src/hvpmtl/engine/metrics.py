"""Run output on rank 0: progress bar, ``metrics.csv`` (one row per step), TensorBoard (and W&B,
MLflow: ``train.loggers``, ``engine/loggers.py``), summary.

Rows arrive in blocks at log intervals (the loop keeps per-step values on the device and reads
them back once per interval). On resume the CSV keeps the rows up to the checkpoint's step and
TensorBoard purges later events, so a resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

FIXED = ("step", "epoch", "lr", "wd")
TAIL = ("grad_norm", "img_per_s", "skipped_steps")


def read_metrics(path: str | Path) -> list[dict]:
    """``metrics.csv`` as a list of dicts of floats (empty list if missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class MetricsLogger:
    """Writes per-step rows; a no-op object on ranks other than 0.

    Args:
        run_dir: run folder (``metrics.csv`` and ``tb/`` go there).
        loss_keys: the logged values, e.g. ``("loss", "loss_mlc", ..., "swav_collapse")``.
        total_steps, start_step: run length and where this session starts (resume).
        global_batch: images per step, for the progress bar's img/s and ETA.
        loggers: ``train.loggers`` (``metrics.csv`` is always written); ``tensorboard`` gives ``self.tb``.
        settings: the ``TrainConfig`` whose ``wandb`` / ``mlflow`` blocks configure those loggers.
        config: the resolved run config, sent to W&B / MLflow.
    """

    def __init__(
        self,
        run_dir: str | Path,
        loss_keys: tuple[str, ...],
        total_steps: int,
        start_step: int,
        global_batch: int,
        enabled: bool = True,
        progress: bool = True,
        desc: str = "pretrain",
        loggers: tuple[str, ...] | list[str] = ("tensorboard",),
        settings: Any = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.tb = None
        self.trackers: list = []
        self.columns = (*FIXED, *loss_keys, *TAIL)
        self.loss_keys = loss_keys
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.csv"
        kept = [r for r in read_metrics(self.path) if r.get("step", math.inf) <= start_step] if start_step > 0 else []
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            for r in kept:
                writer.writerow([_fmt(r.get(c, math.nan)) for c in self.columns])
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self.writer = csv.writer(self.file)
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        if any(name != "tensorboard" for name in loggers):
            from hvpmtl.engine.loggers import open_trackers

            self.trackers = open_trackers(loggers, settings, run_dir, config)
        self.bar = tqdm(
            total=total_steps * global_batch,
            initial=start_step * global_batch,
            unit="img",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not progress,
            file=sys.stderr,
            desc=desc,
        )
        self.global_batch = global_batch

    def log(self, rows: list[dict]) -> None:
        """Append rows (dicts with the columns' keys), update TensorBoard and the progress bar."""
        if not self.enabled or not rows:
            return
        for r in rows:
            self.writer.writerow([_fmt(r.get(c, math.nan)) for c in self.columns])
            for k in (*self.loss_keys, "lr", "grad_norm", "img_per_s") if self.tb is not None else ():
                if k in r and math.isfinite(r[k]):
                    self.tb.add_scalar(f"train/{k}", r[k], int(r["step"]))
        self.file.flush()
        for tracker in self.trackers:
            tracker.log([{c: r[c] for c in self.columns if c in r} for r in rows])
        last = rows[-1]
        post = {k.removeprefix("loss_"): f"{last[k]:.4g}" for k in self.loss_keys if k in last}
        self.bar.set_postfix(post | {"skipped": int(last["skipped_steps"])}, refresh=False)
        self.bar.update(len(rows) * self.global_batch)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            for tracker in self.trackers:
                tracker.close()


def _fmt(v: float) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def summarize(rows: list[dict], loss_keys: tuple[str, ...], window: int = 10) -> dict:
    """First vs last value of each loss (means over the first/last ``window`` finite steps) under
    ``"losses"``, and how many rows had a finite value of each under ``"finite_rows"``."""
    out: dict = {"losses": {}, "finite_rows": {}}
    for k in loss_keys:
        vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]
        out["finite_rows"][k] = len(vals)
        if vals:
            w = max(1, min(window, len(vals) // 4 or 1))
            out["losses"][k] = (sum(vals[:w]) / w, sum(vals[-w:]) / w)
    return out


def format_summary(summary: dict, steps: int, skipped: int, seconds: float, images_per_s: float) -> str:
    """The table printed at the end of a run. A change needs two finite rows (else ``—``); a run
    with skipped steps says how many."""
    finite_rows = summary.get("finite_rows", {})
    lines = [f"{'':16s}{'first':>12s}{'last':>12s}{'change':>10s}"]
    for k, (first, last) in summary["losses"].items():
        change = f"{100 * (last - first) / abs(first):+.1f}%" if first else "n/a"
        if finite_rows.get(k, 2) < 2:  # first and last are the same row
            change = "—"
        lines.append(f"{k:16s}{first:12.5g}{last:12.5g}{change:>10s}")
    lines += [f"{k:16s}{'—':>12s}{'—':>12s}{'—':>10s}" for k, n in finite_rows.items() if n == 0]
    if skipped:
        lines.append(f"skipped steps: {skipped} of {steps} (non-finite loss or gradient)")
    minutes, secs = divmod(int(round(seconds)), 60)
    lines.append(
        f"steps {steps} (skipped {skipped})   time {minutes}m{secs:02d}s   throughput {images_per_s:.1f} img/s"
    )
    return "\n".join(lines)
