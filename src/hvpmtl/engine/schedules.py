"""Per-step schedules, precomputed as arrays (as DINO does): linear warm-up, then cosine.

Paper Sec. 3.3: "the learning rate is warmed-up to 1e-4 in the first 5 epochs, and decayed to
1e-7 following a cosine schedule". Step ``i`` (0-based optimiser step) reads ``schedule[i]``.
"""

from __future__ import annotations

import numpy as np


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """``total_steps`` values: ``base * (i + 1) / W`` for the ``W`` warm-up steps (the last one
    is exactly ``base``), then ``final + (base - final) * (1 + cos(pi * t)) / 2`` with ``t``
    running from 0 to 1, so the last step is exactly ``final``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    warm = base * np.arange(1, warmup_steps + 1, dtype=np.float64) / max(warmup_steps, 1)
    n = total_steps - warmup_steps
    t = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    cos = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * t))
    if n:
        cos[0] = base  # exact end points (no rounding in final + (base - final))
    if n > 1:
        cos[-1] = final
    return np.concatenate([warm, cos])


def warmup_steps_for(warmup_epochs: float, warmup_steps: int, steps_per_epoch: int) -> int:
    """``warmup_steps`` when >= 0, else ``round(warmup_epochs * steps_per_epoch)``."""
    return warmup_steps if warmup_steps >= 0 else int(round(warmup_epochs * steps_per_epoch))
