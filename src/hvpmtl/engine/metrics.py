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
        global_batch: images per step, for the progress bar's img/s when a row has no ``img_per_s``.
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
        self.bar = tqdm(  # counts steps (as train.max_steps and the checkpoints do); img/s in the postfix
            total=total_steps,
            initial=start_step,
            unit="step",
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
        speed = last.get("img_per_s", math.nan)
        if not math.isfinite(speed):  # rows without it: this session's steps over its time so far
            elapsed = self.bar.format_dict["elapsed"]
            done = self.bar.n + len(rows) - self.bar.initial
            speed = done * self.global_batch / elapsed if elapsed > 0 else math.nan
        speed_post = {"img/s": f"{speed:.0f}"} if math.isfinite(speed) else {}
        self.bar.set_postfix(post | speed_post | {"skipped": int(last["skipped_steps"])}, refresh=False)
        self.bar.update(len(rows))

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


def compares_as_change(key: str) -> bool:
    """Whether ``key``'s first-to-last change reads as learning: the training losses. Not
    ``loss_distill`` (the teacher starts as a copy of the student, so it starts near 0 and grows)
    nor bounded quantities (gradient shares and cosines, ``swav_collapse``, k-NN scores), whose
    start and end values are shown instead."""
    return key == "loss" or (key.startswith("loss_") and key != "loss_distill")


def _first_last(vals: list[float], window: int) -> tuple[float, float]:
    w = max(1, min(window, len(vals) // 4 or 1))
    return sum(vals[:w]) / w, sum(vals[-w:]) / w


def summarize(rows: list[dict], loss_keys: tuple[str, ...], window: int = 10, warmup_steps: int = 0) -> dict:
    """Start and end value of each logged key (means over the first/last ``window`` finite rows)
    under ``"losses"``; for the losses (:func:`compares_as_change`) of a run that went past its
    ``warmup_steps``, the start is the first logged step after warm-up (a loss that rises while
    the learning rate ramps up is no divergence) and ``"changes"`` holds the percent change.
    ``"finite_rows"`` counts the rows with a finite value of each key."""
    after = [r for r in rows if r.get("step", math.inf) > warmup_steps] if warmup_steps > 0 else rows
    out: dict = {"losses": {}, "finite_rows": {}, "changes": {}, "warmup_steps": warmup_steps, "window": window,
                 "past_warmup": bool(after), "compare_from": after[0].get("step") if after else None}  # fmt: skip
    for k in loss_keys:
        vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]
        out["finite_rows"][k] = len(vals)
        if not vals:
            continue
        out["losses"][k] = _first_last(vals, window)
        if not compares_as_change(k):
            continue
        vals = [r[k] for r in after if k in r and math.isfinite(r[k])]
        if vals:
            out["losses"][k] = first, last = _first_last(vals, window)
            if len(vals) >= 2 and first:
                out["changes"][k] = 100 * (last - first) / abs(first)
    return out


def format_summary(summary: dict, steps: int, skipped: int, seconds: float, images_per_s: float) -> str:
    """The table printed at the end of a run: start, end and (losses past warm-up) change. A
    change needs two finite rows after warm-up (else ``—``); a run with skipped steps says how many."""
    finite_rows = summary.get("finite_rows", {})
    changes = summary.get("changes", {})
    warmup = summary.get("warmup_steps", 0)
    width = max([16, *(len(k) + 2 for k in finite_rows), *(len(k) + 2 for k in summary["losses"])])
    lines = [f"{'':{width}s}{'start':>12s}{'end':>12s}{'change':>10s}"]
    for k, (first, last) in summary["losses"].items():
        change = f"{changes[k]:+.1f}%" if k in changes else ("—" if compares_as_change(k) else "")
        lines.append(f"{k:{width}s}{first:12.5g}{last:12.5g}{change:>10s}".rstrip())
    lines += [f"{k:{width}s}{'—':>12s}{'—':>12s}{'—':>10s}" for k, n in finite_rows.items() if n == 0]
    steps_word = "step" if warmup == 1 else "steps"
    start = summary.get("compare_from")
    if warmup > 0 and not summary.get("past_warmup", True):
        lines.append(f"run ended within the {warmup} warm-up {steps_word}: no loss comparison")
    elif warmup > 0:
        where = f"from step {start:.0f}, the first" if start is not None else "from the first step"
        lines.append(f"losses compared {where} after the {warmup} warm-up {steps_word} (start, end: means of up to "
                     f"{summary.get('window', 10)} steps)")  # fmt: skip
    values_only = [k for k in summary["losses"] if not compares_as_change(k)]
    if values_only:
        distill = "; loss_distill starts at 0 (the teacher starts as the student)"
        lines.append(f"bounded values: start and end only, no change{distill if 'loss_distill' in values_only else ''}")
    if skipped:
        lines.append(f"skipped steps: {skipped} of {steps} (non-finite loss or gradient)")
    minutes, secs = divmod(int(round(seconds)), 60)
    lines.append(
        f"steps {steps} (skipped {skipped})   time {minutes}m{secs:02d}s   throughput {images_per_s:.1f} img/s"
    )
    return "\n".join(lines)
