"""A tiny finished pre-training run shared by the downstream tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

import hvpmtl
from tiny import TINY_MODEL

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian package dataset-fashion-mnist not installed")

# ViT 32 px, patch 8, depth 2, width 32: every downstream command runs on it in seconds
TINY_RUN = [
    *TINY_MODEL,
    "data.batch_size=16",
    "data.train_size=64",
    "data.val_size=32",
    "data.num_workers=0",
    "optim.lr=1e-3",
    "optim.warmup_steps=1",
    "train.max_steps=4",
    "train.ckpt_every=2",
    "train.keep_ckpts=0",
    "train.log_every=2",
    "train.progress=false",
    "eval.knn_every=2",
    "eval.knn_train_images=48",
    "eval.knn_val_images=24",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 4-step run: config.yaml, checkpoints at steps 2 and 4, model/backbone safetensors,
    metrics.csv with k-NN monitor columns."""
    from hvpmtl.pretraining import pretrain

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    pretrain(hvpmtl.load_config(None, [*TINY_RUN, f"train.output_dir={out}"]))
    return out
