"""UperNet segmentation (eval/segmentation.py): mIoU on hand-built cases, shapes, training, errors.

The metric cases go through :func:`evaluate_segmentation` with an "oracle" model that reads the
class it predicts from the image itself (channel 0 = 40 x class), so a perfect, a known partial
and an ignore-masked prediction give values computed here by hand.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from hvpmtl.backbones import BackboneConfig
from hvpmtl.config import from_dict
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.metrics import read_metrics
from hvpmtl.eval.config import SegmentRunConfig
from hvpmtl.eval.segmentation import (
    build_upernet,
    evaluate_segmentation,
    run_segment,
    segmentation_metrics,
    segmentation_task,
)
from hvpmtl.eval.weights import Weights

TINY_VIT = BackboneConfig("vit_tiny_patch16_224", 32, 8, kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
TINY_SWIN = BackboneConfig(
    "swin_tiny_patch4_window7_224",
    64,
    window_size=4,
    kwargs={"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
)
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def seg_cfg(**blocks) -> SegmentRunConfig:
    base = {"segment": {"decoder_channels": 32}, "train": {"progress": False}, "data": {"num_workers": 0}}
    for k, v in blocks.items():
        base[k] = {**base.get(k, {}), **v}
    return from_dict(SegmentRunConfig, base)


class Items(Dataset):
    """Items whose image encodes ``pred`` (channel 0 = 40 x class) and whose label is ``mask``."""

    def __init__(self, preds: list[torch.Tensor], masks: list[torch.Tensor]):
        self.preds, self.masks = preds, masks

    def __len__(self) -> int:
        return len(self.preds)

    def __getitem__(self, i: int) -> dict:
        image = (self.preds[i] * 40).to(torch.uint8).expand(3, -1, -1).clone()
        return {"image": image, "mask": self.masks[i], "index": i}


class Oracle(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: unnormalised (UNIT), in [0, 1]
        cls = (x[:, 0] * 255 / 40).round().long()
        return F.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float()


def _evaluate(preds, masks, num_classes=4, env: DistEnv | None = None) -> dict:
    data, env = Items(preds, masks), env or DistEnv()
    return evaluate_segmentation(
        Oracle(num_classes), data, num_classes, env, img_size=4, stride=4, batch_size=2, **UNIT
    )


TARGET = torch.tensor([[0, 0, 1, 1]] * 4)  # left half class 0, right half class 1 (classes 2, 3 absent)


def test_perfect_prediction_scores_100():
    out = _evaluate([TARGET, TARGET.flip(1)], [TARGET, TARGET.flip(1)])
    assert out == pytest.approx({"mIoU": 100.0, "pixel_acc": 100.0})


def test_partial_prediction_gives_the_hand_computed_iou():
    pred = TARGET.clone()
    pred[:, 2] = 0  # one column of class 1 predicted as 0
    # class 0: TP 8, FP 4, FN 0 -> 8/12; class 1: TP 4, FN 4 -> 4/8; classes 2, 3 absent: not averaged
    out = _evaluate([pred, TARGET], [TARGET, TARGET])
    iou0, iou1 = (8 + 8) / (16 + 4), (4 + 8) / (12 + 4)  # summed over the two images (confusion matrix)
    assert out["mIoU"] == pytest.approx(100 * (iou0 + iou1) / 2)
    assert out["pixel_acc"] == pytest.approx(100 * 28 / 32)
    # the same through torchmetrics directly, on one image
    m = segmentation_metrics(4)
    m.update(pred[None], TARGET[None])
    assert 100 * float(m.compute()["mIoU"]) == pytest.approx(100 * (8 / 12 + 4 / 8) / 2)


def test_ignored_pixels_do_not_count():
    pred = TARGET.clone()
    pred[:, 2] = 3  # wrong, but only where the label is ignored
    label = TARGET.clone()
    label[:, 2] = 255
    assert _evaluate([pred], [label]) == pytest.approx({"mIoU": 100.0, "pixel_acc": 100.0})


def test_all_background_prediction():
    label = TARGET.clone()
    label[0] = 2
    out = _evaluate([torch.zeros_like(label)], [label])
    # class 0: TP 6 of 16 predicted pixels; classes 1 and 2: 0; class 3 absent
    assert out["mIoU"] == pytest.approx(100 * (6 / 16) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 6 / 16)


@pytest.mark.parametrize("backbone", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_upernet_gives_logits_at_input_size_and_every_parameter_learns(backbone):
    torch.manual_seed(0)
    model = build_upernet(Weights(backbone, None, "random"), seg_cfg(), num_classes=5)
    assert model.has_unused_parameters is False
    s = backbone.img_size
    logits = model(torch.randn(2, 3, s, s))
    assert logits.shape == (2, 5, s, s)
    logits.square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("pyramid.backbone.model.blocks") or ".layers." in n for n in trainable)
    assert [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())
    ] == []
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, s + 16, s - 8)).shape == (1, 5, s + 16, s - 8)


def test_batch_of_one_raises_a_clear_error():
    cfg = seg_cfg(data={"batch_size": 1})
    with pytest.raises(ValueError, match="data.batch_size=1"):
        segmentation_task(Weights(TINY_VIT, None, "random"), cfg, Items([], []), Items([], []), 5, DistEnv())
    model = build_upernet(Weights(TINY_VIT, None, "random"), seg_cfg(), num_classes=5).train()
    with pytest.raises(ValueError, match="data.batch_size"):
        model(torch.randn(1, 3, 32, 32))


def _tiny_run_cfg(**train) -> SegmentRunConfig:
    return seg_cfg(
        data={"train_size": 32, "val_size": 8, "batch_size": 8},
        optim={"lr": 1e-2, "min_lr": 1e-4, "warmup_steps": 2},
        train={"epochs": 1, "max_steps": 16, "log_every": 1, "ckpt_every": 1000, **train},
    )


@pytest.mark.slow
def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    out = run_segment(_tiny_run_cfg(), Weights(TINY_VIT, None, "random"), tmp_path, DistEnv())
    assert out["train_images"] == 32 and out["val_images"] == 8
    assert set(out["metrics"]) == {"mIoU", "pixel_acc"} and 0 <= out["metrics"]["mIoU"] <= 100
    loss = [row["loss"] for row in read_metrics(tmp_path / "metrics.csv")]
    assert len(loss) == 16
    first, last = sum(loss[:4]) / 4, sum(loss[-4:]) / 4
    assert last < 0.7 * first, loss
    assert (tmp_path / "ade-data" / "annotations" / "validation" / "00000007.png").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, run_dir: str, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        env = DistEnv(rank, 2)
        oracle = _evaluate(*_shard_case(), env=env)
        run = run_segment(_tiny_run_cfg(max_steps=4), Weights(TINY_VIT, None, "random"), run_dir, env)
        result[rank] = (oracle, run["metrics"])
    finally:
        dist.destroy_process_group()


def _shard_case() -> tuple[list, list]:
    g = torch.Generator().manual_seed(0)
    masks = [torch.randint(0, 4, (4, 4), generator=g) for _ in range(5)]
    preds = [
        torch.where(torch.rand(4, 4, generator=g) < 0.7, m, torch.randint(0, 4, (4, 4), generator=g)) for m in masks
    ]
    return preds, masks


@pytest.mark.slow
def test_two_processes_shard_the_evaluation_and_agree(tmp_path):
    """Sharded evaluation = one process's; DDP training (global BatchNorm, no unused-parameter
    search, checkpoints) runs and every rank returns the same metrics."""
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_worker, args=(free_port(), str(tmp_path), result), nprocs=2, join=True)
    single = _evaluate(*_shard_case())
    assert result[0][0] == pytest.approx(single) and result[1][0] == pytest.approx(single)
    assert result[0][1] == result[1][1]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in read_metrics(tmp_path / "metrics.csv"))
    assert (tmp_path / "checkpoints").is_dir()


def test_run_from_pretrained_weights_repeats_exactly(tmp_path):
    """The new pyramid, decoder and head are seeded by train.seed, whatever the process's RNGs
    were before (each fresh process starts elsewhere)."""
    import numpy as np

    from hvpmtl.backbones import build_backbone

    torch.manual_seed(7)
    weights = Weights(TINY_VIT, build_backbone(TINY_VIT).model.state_dict(), "pretrained")
    cfg = seg_cfg(data={"train_size": 8, "val_size": 2, "batch_size": 8},
                  train={"epochs": 1, "max_steps": 1, "log_every": 1})  # fmt: skip
    losses = []
    for i in range(2):
        torch.manual_seed(100 + i)
        np.random.seed(100 + i)
        run_segment(cfg, weights, tmp_path / f"run{i}", DistEnv())
        losses.append(read_metrics(tmp_path / f"run{i}" / "metrics.csv")[0]["loss"])
    assert losses[0] == losses[1]
