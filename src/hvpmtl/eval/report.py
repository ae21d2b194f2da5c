"""Results of the downstream commands: one JSON file each and one row in ``results.md``.

Every command writes ``<output>/<stem>.json`` (metrics, settings, weights, data, date) and
appends one line to ``<output>/results.md``, a markdown table shared by all commands, so the
results of one run (and of its random-init baseline) read as one table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

HEADER = "| date | command | weights | data | metrics | settings |\n|---|---|---|---|---|---|\n"


def data_label(data: Any) -> str:
    """A short name of a data source: the built-in set's name, the manifest's file name, or
    ``imagefolder <folder>``."""
    name = data.dataset
    if data.dataset == "manifest":
        name = Path(data.manifest).name
    elif data.dataset == "imagefolder":
        name = f"imagefolder {Path(data.root).name}"
    return name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(v)


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def write_result(
    out_dir: str | Path,
    stem: str,
    command: str,
    weights: str,
    data: str,
    metrics: dict,
    settings: dict | None = None,
    extra: dict | None = None,
    echo: bool = True,
) -> Path:
    """Write ``<out_dir>/<stem>.json`` and append the row to ``<out_dir>/results.md`` (and print
    it unless ``echo`` is false: a caller with its own summary); returns the JSON path. Call on
    rank 0 only."""
    from hvpmtl.engine.checkpoint import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d %H:%M")
    record = {"command": command, "weights": weights, "data": data, "metrics": metrics,
              "settings": settings or {}, "date": date, **(extra or {})}  # fmt: skip
    path = out / f"{stem}.json"
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode()))
    row = (
        f"| {date} | {command} | {weights} | {data} | {format_metrics(metrics)} | {format_metrics(settings or {})} |\n"
    )
    table = out / "results.md"
    if not table.is_file():
        table.write_text(HEADER)
    with open(table, "a") as f:
        f.write(row)
    if echo:
        print(row.strip())
    return path
