"""Shared helpers for the engine tests: a tiny model/data config and CLI runners."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import TINY_MODEL

SRC = str(Path(__file__).resolve().parents[2] / "src")

# A model small enough for dozens of CPU steps per second of test time.
# the shared tiny model's heads and width at the preset's own image size (64 px on cpu-tiny)
TINY = [
    *(o for o in TINY_MODEL if not o.startswith(("backbone.name", "backbone.img_size", "backbone.patch_size",
                                                  "tasks.mim"))),
    "backbone.kwargs={depth: 2, embed_dim: 64, num_heads: 2}",
    "tasks.swav.out_dim=32",
    "tasks.swav.num_prototypes=16",
    "tasks.swav.freeze_prototypes_iters=3",
    "data.batch_size=16",
    "data.train_size=96",
    "data.val_size=32",
    "data.num_workers=1",
    "optim.lr=1e-3",
    "optim.warmup_steps=3",
    "train.progress=false",
    "train.log_every=4",
]


def env_with_src() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m hvpmtl ARGS`` on a free local port."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "hvpmtl", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env_with_src(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_cli(capsys):
    """Run ``hvpmtl ARGS`` in-process; returns ``(exit status, stdout, stderr)``."""
    from hvpmtl.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        rc = main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run
