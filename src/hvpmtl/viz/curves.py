"""Training curves of a run as one PNG (``hvpmtl visualize curves``; needs matplotlib: the ``viz`` extra).

Panels, each drawn only when the run logged it (``metrics.csv``): the losses (total and each
objective's unweighted term, log scale), the learning rate, SwAV's ``swav_collapse``, each
objective's share of the backbone gradient (``grad_share_*``), the cosines between objectives'
gradients (``grad_cos_*``), the k-NN monitor (``knn_*``); then one line per downstream result in
``<run>/eval/*.json``. Per-step values are drawn faint with a moving average over them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hvpmtl.engine.metrics import read_metrics

FIG_W, PANEL_H, DPI = 10.0, 3.0, 100  # inches, inches, pixels per inch
RESULT_LINE_H, RESULT_MARGIN_H = 0.22, 0.6  # inches per downstream result line, plus the title's
RESULT_CHARS = 140  # longer result lines are cut (8 pt monospace across the figure)


def panels(rows: list[dict]) -> list[tuple[str, list[str], bool]]:
    """``(title, columns, log_y)`` of each panel the rows have data for."""
    cols = list(rows[0]) if rows else []

    def logged(names: list[str]) -> list[str]:
        return [c for c in names if any(math.isfinite(r.get(c, math.nan)) for r in rows)]

    spec = [
        ("losses", logged(["loss", *(c for c in cols if c.startswith("loss_"))]), True),
        ("learning rate", logged(["lr"]), False),
        ("SwAV collapse (1 = uniform predictions)", logged(["swav_collapse"]), False),
        ("share of the backbone gradient", logged([c for c in cols if c.startswith("grad_share_")]), False),
        ("cosine between objectives' gradients", logged([c for c in cols if c.startswith("grad_cos_")]), False),
        ("k-NN monitor", logged([c for c in cols if c.startswith("knn_")]), False),
    ]
    return [p for p in spec if p[1]]


def downstream_results(run_dir: str | Path) -> list[str]:
    """One line per ``<run>/eval/*.json``: ``command | data | weights: metrics``."""
    from hvpmtl.eval.report import format_metrics
    from hvpmtl.runs import read_results

    return [f"{r['command']} | {r['data']} | {r['weights']}: {format_metrics(r['metrics'])}"
            for r in read_results(run_dir)]  # fmt: skip


def figure_size(num_panels: int, num_results: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`plot_curves`' PNG."""
    height = math.ceil(num_panels / 2) * PANEL_H + (RESULT_MARGIN_H + RESULT_LINE_H * num_results if num_results else 0)
    return round(FIG_W * DPI), round(height * DPI)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` values (shorter at the ends)."""
    if window <= 1 or len(values) < 3:
        return values
    c = np.concatenate([[0.0], np.cumsum(values)])
    half = window // 2
    lo = np.clip(np.arange(len(values)) - half, 0, len(values))
    hi = np.clip(np.arange(len(values)) + half + 1, 0, len(values))
    return (c[hi] - c[lo]) / (hi - lo)


def plot_curves(run_dir: str | Path, out: str | Path) -> Path:
    """Draw the run's curves (and downstream results) into the PNG ``out``; returns its path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    rows = read_metrics(path)
    if not rows:
        raise FileNotFoundError(f"{path}: no such file or no rows (has the run logged a step yet?)")
    spec, results = panels(rows), downstream_results(run_dir)
    width, height = figure_size(len(spec), len(results))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    grid_rows = math.ceil(len(spec) / 2)
    heights = [PANEL_H] * grid_rows + ([RESULT_MARGIN_H + RESULT_LINE_H * len(results)] if results else [])
    gs = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    steps = np.array([r["step"] for r in rows])
    for i, (title, columns, log_y) in enumerate(spec):
        ax = fig.add_subplot(gs[i // 2, i % 2])
        for column in columns:
            y = np.array([r.get(column, math.nan) for r in rows])
            ok = np.isfinite(y) & ((y > 0) if log_y else True)
            x, y = steps[ok], y[ok]
            window = max(1, len(y) // 50)
            marker = "o" if len(y) <= 30 else None  # sparse values (gradient shares, k-NN): show each one
            line = ax.plot(x, smooth(y, window), label=column, linewidth=1.2, marker=marker, markersize=3)[0]
            if window > 1:
                ax.plot(x, y, color=line.get_color(), alpha=0.25, linewidth=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
        if len(columns) > 1 or title == "k-NN monitor":
            ax.legend(fontsize=7)
    if results:
        ax = fig.add_subplot(gs[grid_rows, :])
        ax.axis("off")
        ax.set_title("downstream results (eval/*.json)", fontsize=10, loc="left")
        for j, line in enumerate(results):
            line = line if len(line) <= RESULT_CHARS else line[: RESULT_CHARS - 1] + "…"
            text = ax.text(0.0, 1.0 - (j + 0.5) / len(results), line, fontsize=8, family="monospace", va="center",
                           transform=ax.transAxes)  # fmt: skip
            text.set_in_layout(False)  # long lines must not squeeze the panels above
    fig.suptitle(run_dir.name, fontsize=11)
    out = Path(out)
    _save(fig, out)
    return out


def _save(fig, out: Path) -> None:
    import io

    from hvpmtl.engine.checkpoint import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write(out, lambda f: f.write(buffer.getvalue()))
