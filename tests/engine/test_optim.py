"""AdamW parameter groups and per-step lr / weight decay (engine/optim.py, loop.py)."""

from __future__ import annotations

import torch

import hvpmtl
from hvpmtl.engine.config import OptimConfig
from hvpmtl.engine.optim import build_optimizer

from .conftest import TINY


def _model():
    cfg = hvpmtl.load_config("cpu-tiny", [o for o in TINY if o.startswith(("backbone", "tasks"))])
    return hvpmtl.build(cfg, num_classes=10)


def test_weight_decay_excludes_norms_biases_tokens_and_embeddings():
    model = _model()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["wd_scale"] == (1.0 if g["weight_decay"] > 0 else 0.0) for g in opt.param_groups)
    for n in (
        "backbone.mask_token", "backbone.model.cls_token", "backbone.model.pos_embed",
        "backbone.model.norm.weight", "backbone.model.blocks.0.attn.qkv.bias", "mlc.label_embed.weight",
    ):  # fmt: skip
        assert n in plain, n
    assert "backbone.model.blocks.0.attn.qkv.weight" in decayed
    assert "backbone.model.patch_embed.proj.weight" in decayed
    assert not any(n.startswith("teacher.") for n in decayed | plain)  # the teacher is not trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain


def test_implementation_choice():
    model = _model()
    assert build_optimizer(model, OptimConfig(impl="foreach"), torch.device("cpu")).defaults["foreach"]
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert opt.defaults["fused"] or opt.defaults["foreach"]


def test_trainer_applies_schedules_per_step(tmp_path):
    from hvpmtl.engine.distributed import DistEnv
    from hvpmtl.engine.loop import Trainer

    cfg = hvpmtl.load_config(
        "cpu-tiny", [*TINY, "train.max_steps=10", "optim.warmup_steps=4", "optim.weight_decay_end=0.5",
                     f"train.output_dir={tmp_path}"],
    )  # fmt: skip
    trainer = Trainer(cfg, DistEnv())
    assert trainer.lr[3] == cfg.optim.lr and trainer.lr[-1] == cfg.optim.min_lr
    assert trainer.wd[0] == 0.05 and abs(trainer.wd[-1] - 0.5) < 1e-12
    trainer.sampler.set_epoch(0)
    trainer.step = 9
    trainer._train_step(iter(trainer.loader))
    groups = trainer.optimizer.param_groups
    assert all(g["lr"] == cfg.optim.min_lr for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]
