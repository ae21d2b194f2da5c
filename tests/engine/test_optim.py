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
    from hvpmtl.pretraining import Trainer

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


def test_frozen_prototypes_take_no_adamw_step(tmp_path):
    """While frozen (3 steps) the prototypes have no gradient, so AdamW neither decays them nor
    counts steps for them; the first update after the thaw is a first AdamW step (``lr`` per
    element), not one bias-corrected as if 3 zero gradients came before (SwAV's own loop)."""
    from hvpmtl.engine.distributed import DistEnv
    from hvpmtl.pretraining import Trainer

    cfg = hvpmtl.load_config("cpu-tiny", [*TINY, "data.num_workers=0", "train.max_steps=4", "optim.warmup_steps=0",
                                          f"train.output_dir={tmp_path}"])  # fmt: skip
    trainer = Trainer(cfg, DistEnv())
    protos = trainer.inner.swav.prototypes.weight
    group = next(g for g in trainer.optimizer.param_groups if any(p is protos for p in g["params"]))
    seen = {}
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.update(before=protos.detach().clone(), grad=protos.grad))
    trainer.optimizer.register_step_post_hook(lambda *_: seen.update(after=protos.detach().clone()))
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    for step in range(cfg.tasks.swav.freeze_prototypes_iters):
        trainer.step = step
        assert trainer._train_step(batches)[2]
        assert seen["grad"] is None and torch.equal(seen["after"], seen["before"]), step
        assert protos not in trainer.optimizer.state
    trainer.step = cfg.tasks.swav.freeze_prototypes_iters
    assert trainer._train_step(batches)[2]
    assert int(trainer.optimizer.state[protos]["step"]) == 1
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    g = seen["grad"]
    first_adamw_step = seen["before"] * (1 - lr * wd) - lr * g / (g.abs() + eps)
    torch.testing.assert_close(seen["after"], first_adamw_step, rtol=1e-5, atol=1e-7)
