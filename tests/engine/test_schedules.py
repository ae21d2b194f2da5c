"""Per-step schedules (engine/schedules.py)."""

from __future__ import annotations

import numpy as np
import pytest

from hvpmtl.engine.schedules import warmup_cosine, warmup_steps_for


def test_warmup_reaches_lr_and_cosine_ends_at_min_lr():
    s = warmup_cosine(1e-4, 1e-7, total_steps=100, warmup_steps=10)
    assert len(s) == 100
    assert s[0] == pytest.approx(1e-5)
    assert s[9] == pytest.approx(1e-4)  # last warm-up step is exactly lr
    assert s[10] == pytest.approx(1e-4)  # cosine starts at lr
    assert s[-1] == pytest.approx(1e-7)  # and ends exactly at min_lr
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) <= 0)
    mid = 10 + (90 - 1) / 2
    assert np.interp(mid, np.arange(100), s) == pytest.approx((1e-4 + 1e-7) / 2, rel=1e-3)


def test_edge_cases():
    assert warmup_cosine(1.0, 0.0, 1).tolist() == [1.0]
    assert warmup_cosine(1.0, 0.0, 5, 10).tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert warmup_cosine(0.05, 0.05, 4).tolist() == pytest.approx([0.05] * 4)  # constant wd
    with pytest.raises(ValueError):
        warmup_cosine(1.0, 0.0, 0)


def test_warmup_steps_from_epochs():
    assert warmup_steps_for(5.0, -1, 1250) == 6250  # paper: 5 epochs
    assert warmup_steps_for(5.0, 20, 1250) == 20  # explicit steps win
