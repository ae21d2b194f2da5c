"""Shared fixtures: tiny configs that build in milliseconds on CPU."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import hvpmtl
from tiny import TINY_MODEL

TINY_VIT = [*TINY_MODEL, "data.num_classes=5"]


class Points(torch.utils.data.Dataset):
    """Two Gaussian blobs of 4-d points, for loop tests on a toy task; keys ``index`` or
    ``(index, epoch)`` as the sampler yields them."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 4, generator=g) + 2.0 * self.y[:, None]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.x[i], self.y[i]


def tiny_config(*overrides: str) -> hvpmtl.Config:
    return hvpmtl.load_config(None, [*TINY_VIT, *overrides])


def make_batch(cfg: hvpmtl.Config, batch_size: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = cfg.backbone.img_size
    C = cfg.data.num_classes
    labels = (torch.rand(batch_size, C, generator=g) > 0.6).float()
    labels[:, 0] = 1.0  # at least one positive per image
    return {
        "views": [torch.randn(batch_size, 3, s, s, generator=g) for _ in range(2)],
        "mask": hvpmtl.mask_generator(cfg)(batch_size, generator=g),
        "labels": labels,
    }


@pytest.fixture
def tiny_cfg() -> hvpmtl.Config:
    return tiny_config()


@contextmanager
def held_by_another_run(run_dir: Path, pid: int = 4242) -> Iterator[None]:
    """``run_dir``'s lock held, as another run holding it under ``pid`` would (engine/run_dir.py)."""
    from hvpmtl.engine.run_dir import LOCK_NAME

    with open(run_dir / LOCK_NAME, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write(f"{pid}\n")
        other.flush()
        yield


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of ``hvpmtl ARGV`` run in this process."""
    from hvpmtl.cli import main

    status = main(list(argv))
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, *expected: str) -> None:
    """A usage error: exit 2 and one ``error: ...`` line holding each of ``expected``, no traceback."""
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
