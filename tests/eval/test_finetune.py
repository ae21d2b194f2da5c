"""eval/finetune.py and eval/downstream.py: layer-wise lr decay, weight loading, end-to-end fine-tuning."""

from __future__ import annotations

import pytest
import torch

import hvpmtl
from hvpmtl.config import load_config
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.eval.config import FinetuneRunConfig
from hvpmtl.eval.downstream import layer_decay_groups
from hvpmtl.eval.finetune import build_classifier, run_finetune
from hvpmtl.eval.weights import Weights, resolve_weights

from .conftest import needs_fmnist

SWIN = ["backbone.kwargs={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}", "backbone.img_size=32"]


def _scales(model, ld: float) -> dict[str, float]:
    groups = layer_decay_groups(model, model, 0.05, ld)
    by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_layer_decay_gives_each_block_its_rate(tiny_run, family):
    cfg = load_config(None, [], cls=FinetuneRunConfig)
    if family == "vit":
        weights, blocks = resolve_weights(tiny_run), ["blocks.0.", "blocks.1."]
        stem = "pos_embed"
    else:
        weights = Weights(hvpmtl.load_config("cpu-swin-tiny", SWIN).backbone, None, "swin")
        blocks, stem = [f"layers.{i}.blocks.0." for i in range(4)], "patch_embed.proj.weight"
    model = build_classifier(weights, 5, cfg)
    scale = _scales(model, 0.5)
    per_block = []
    for prefix in blocks:
        values = {v for n, v in scale.items() if n.startswith(prefix)}
        assert len(values) == 1, (prefix, values)  # one rate per block
        per_block.append(values.pop())
    for lower, upper in zip(per_block, per_block[1:]):
        assert lower == pytest.approx(0.5 * upper)  # each block: layer_decay x the next one
    assert scale[stem] == pytest.approx(0.5 * per_block[0])
    assert all(v == 1.0 for n, v in scale.items() if n.startswith("head"))
    assert set(_scales(model, 1.0).values()) == {1.0}


def test_classifier_carries_the_pretrained_backbone(tiny_run):
    weights = resolve_weights(tiny_run)
    model = build_classifier(weights, 7, load_config(None, [], cls=FinetuneRunConfig))
    for key in ("blocks.1.mlp.fc2.weight", "pos_embed", "norm.weight"):
        assert torch.equal(model.state_dict()[key], weights.state[key])
    assert model.head.weight.shape == (7, 32)
    assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.Identity)  # SimMIM mean pooling
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


FAST = ["data.batch_size=32", "data.num_workers=0", "train.epochs=3", "train.progress=false", "train.log_every=4",
        "optim.warmup_epochs=0.5", "optim.lr=3e-3", "finetune.layer_decay=0.8", "finetune.reprob=0.0",
        "finetune.crop_scale=[0.5, 1.0]"]  # fmt: skip


@pytest.mark.slow
def test_multi_label_finetune_beats_a_random_scorer(tiny_run, tmp_path):
    cfg = load_config(None, [*FAST, "data.train_size=256", "data.val_size=128", "finetune.mixup=0", "finetune.cutmix=0",
                             "finetune.auto_augment=''", "finetune.ema=true", "finetune.ema_decay=0.9"],
                      cls=FinetuneRunConfig, base={"data": {"dataset": "synthetic"}})  # fmt: skip
    out = run_finetune(cfg, resolve_weights(tiny_run), tmp_path / "ft", DistEnv())
    assert out["multi_label"] and out["classes"] == 10
    assert out["metrics"]["mAP"] > 32  # a random scorer: ~25 % (the share of positive labels)
    assert "mAP" in out["ema_metrics"] and len(out["history"]) == 3
    rows = (tmp_path / "ft" / "metrics.csv").read_text().splitlines()
    losses = [float(r.split(",")[4]) for r in rows[1:]]
    assert sum(losses[-4:]) < sum(losses[:4])
    # running the same command again resumes the finished run: no step is trained twice
    again = run_finetune(cfg, resolve_weights(tiny_run), tmp_path / "ft", DistEnv())
    assert again["steps"] == out["steps"] and again["metrics"] == pytest.approx(out["metrics"])


@pytest.mark.slow
@needs_fmnist
def test_single_label_finetune_with_mixup_beats_chance(tiny_run, tmp_path):
    cfg = load_config(None, [*FAST, "data.dataset=fmnist", "data.train_size=1024", "data.val_size=256",
                             "data.eval_crop_pct=1.0", "train.epochs=4", "finetune.auto_augment=''"],
                      cls=FinetuneRunConfig)  # fmt: skip
    out = run_finetune(cfg, resolve_weights(tiny_run), tmp_path / "ft", DistEnv())
    assert not out["multi_label"] and set(out["metrics"]) == {"top1", "top5"}
    assert out["metrics"]["top1"] > 20  # chance: 10 % (a 2-block, 32-wide ViT after 128 steps)


def test_run_from_pretrained_weights_repeats_exactly(tiny_run, tmp_path):
    """The new head (and Mixup's numpy draws) are seeded by train.seed, whatever the process's
    RNGs were before (each fresh process starts elsewhere)."""
    import numpy as np

    from hvpmtl.engine.metrics import read_metrics

    cfg = load_config(None, ["data.batch_size=16", "data.num_workers=0", "data.train_size=16", "data.val_size=8",
                             "train.max_steps=1", "train.log_every=1", "train.progress=false"],
                      cls=FinetuneRunConfig, base={"data": {"dataset": "synthetic"}})  # fmt: skip
    assert cfg.finetune.mixup > 0  # Mixup draws from numpy's global RNG
    losses = []
    for i in range(2):
        torch.manual_seed(100 + i)
        np.random.seed(100 + i)
        run_finetune(cfg, resolve_weights(tiny_run), tmp_path / f"ft{i}", DistEnv())
        losses.append(read_metrics(tmp_path / f"ft{i}" / "metrics.csv")[0]["loss"])
    assert losses[0] == losses[1]
