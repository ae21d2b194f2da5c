"""Objectives as plug-ins (objectives/base.py, hvp.py): a fifth objective is one registered class,
and composing the paper's four through the registry changes no number."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hvpmtl
from conftest import make_batch, tiny_config
from hvpmtl.backbones import build_backbone
from hvpmtl.config import ConfigError, load_config, save_config, to_dict
from hvpmtl.objectives import Objective, objective_types, register_objective, unregister_objective
from hvpmtl.objectives.distill import image_embedding, label_similarity, symmetric_kl
from hvpmtl.objectives.mim import SimMIMDecoder, masked_l1_loss
from hvpmtl.objectives.mlc import Query2LabelDecoder, weighted_asymmetric_loss
from hvpmtl.objectives.swav import SwAVHead, swav_loss

OTHERS_OFF = [f"tasks.{t}.weight=0" for t in ("mlc", "swav", "mim", "distill")]


@dataclass
class ToyConfig:
    weight: float = 0.5
    scale: float = 1.0  # target = scale * mean colour


class ToyObjective(Objective):
    """Predicts the clean view's mean colour (B x 3) from its pooled feature."""

    modules = ("toy",)
    logged = ("toy_abs_error",)

    def build(self, model, num_classes):
        return {"toy": nn.Linear(model.backbone.num_features, 3)}

    def inputs(self, plan):
        return {"toy": (plan.clean_view, False)}

    def forward(self, model, step, with_loss):
        images, _ = step.pixels("toy")
        pred, target = model.toy(step.pooled("toy")), self.cfg.scale * images.mean((2, 3))
        return {"loss": F.mse_loss(pred, target), "toy_abs_error": (pred - target).abs().mean().detach()}


@pytest.fixture
def toy():
    register_objective("toy", ToyConfig)(ToyObjective)
    yield ToyObjective
    unregister_objective("toy")


def _images_through_backbone(model, batch) -> int:
    seen = []
    handle = model.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    model(batch)
    handle.remove()
    return sum(seen)


# ----------------------------------------------------------------------------------------------
# a registered objective


def test_build_composes_a_registered_objective(toy):
    cfg = tiny_config("tasks.toy.scale=2.0")
    model = hvpmtl.build(cfg).eval()
    assert model.weights == {"mlc": 0.001, "swav": 0.02, "mim": 1.0, "distill": 10.0, "toy": 0.5}
    assert isinstance(model.toy, nn.Linear) and {"toy.weight", "toy.bias"} <= set(model.state_dict())
    assert model.logged_extras == ("swav_collapse", "toy_abs_error")
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model(batch)
        clean = batch["views"][1 - cfg.tasks.routing.masked_view]
        expected = F.mse_loss(model.toy(model.backbone(clean)[1]), 2.0 * clean.mean((2, 3)))
    torch.testing.assert_close(out["loss_toy"], expected)
    assert out["toy_abs_error"] > 0
    parts = ("mlc", "swav", "mim", "distill", "toy")
    torch.testing.assert_close(out["loss"], sum(model.weights[t] * out[f"loss_{t}"] for t in parts))
    # it reads the clean view, which MLC encodes already: still two backbone passes per image
    assert _images_through_backbone(model, batch) == 2 * 4


def test_registered_objective_trains_the_backbone_alone(toy):
    cfg = tiny_config(*OTHERS_OFF, "data.num_classes=null")
    model = hvpmtl.build(cfg)
    assert model.weights == {"toy": 0.5} and model.mlc is None and model.teacher is None
    out = model({"views": make_batch(tiny_config())["views"]})  # no mask, no labels needed
    assert set(out) == {"loss", "loss_toy", "toy_abs_error"}
    out["loss"].backward()
    assert all(p.grad is not None for p in model.toy.parameters())
    assert model.backbone.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_weight_zero_removes_a_registered_objective(toy):
    cfg = tiny_config("tasks.toy.weight=0")
    model = hvpmtl.build(cfg)
    assert model.toy is None and "toy" not in model.weights and model.logged_extras == ("swav_collapse",)
    assert not any(k.startswith("toy.") for k in model.state_dict())
    assert not {"loss_toy", "toy_abs_error"} & set(model(make_batch(cfg)))


def test_config_block_of_a_registered_objective_is_checked_and_saved(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'tasks.toy.sclae' \(known: scale, weight\)"):
        tiny_config("tasks.toy.sclae=2")
    with pytest.raises(ConfigError, match="tasks.toy.weight: expected float, got 'high'"):
        tiny_config("tasks.toy.weight=high")
    cfg = tiny_config("tasks.toy.scale=3")
    assert cfg.tasks.toy == ToyConfig(0.5, 3.0)
    assert list(to_dict(cfg.tasks)) == ["mlc", "swav", "mim", "distill", "toy", "routing"]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).tasks.toy == ToyConfig(0.5, 3.0)


def test_an_unregistered_objective_is_an_unknown_key():
    assert "toy" not in objective_types()
    known = r"\(known: distill, mim, mlc, routing, swav\)"
    with pytest.raises(ConfigError, match=rf"unknown config key 'tasks.toy' {known}"):
        tiny_config("tasks.toy.weight=1")


def test_a_config_made_before_registration_reads_the_block_defaults():
    cfg = tiny_config()
    register_objective("toy", ToyConfig)(ToyObjective)
    try:
        assert cfg.tasks.toy == ToyConfig() and to_dict(cfg)["tasks"]["toy"] == {"weight": 0.5, "scale": 1.0}
    finally:
        unregister_objective("toy")


def test_registration_errors_are_clear(toy):
    class Other(ToyObjective):
        modules = ("other",)

    with pytest.raises(ValueError, match="'toy' is registered already"):
        register_objective("toy", ToyConfig)(Other)
    with pytest.raises(ValueError, match=r"module name\(s\) \['toy'\] are used already"):
        register_objective("toy2", ToyConfig)(type("Toy2", (ToyObjective,), {}))
    with pytest.raises(ValueError, match=r"requires \['nope'\]: register those first"):
        register_objective("needy", ToyConfig)(type("Needy", (Other,), {"requires": ("nope",)}))
    with pytest.raises(TypeError, match="dataclass with a 'weight' field"):
        register_objective("other", dict)(Other)
    with pytest.raises(ValueError, match="other than 'routing'"):
        register_objective("routing", ToyConfig)(Other)
    with pytest.raises(ValueError, match="required by"):
        unregister_objective("mlc")
    assert list(objective_types()) == ["mlc", "swav", "mim", "distill", "toy"]


def test_md_runs_right_after_the_mlc_decoder_it_reads():
    model = hvpmtl.build(tiny_config())
    assert model.forward_order == ["mlc", "distill", "swav", "mim"]
    md_only = hvpmtl.build(tiny_config("tasks.mlc.weight=0", "tasks.swav.weight=0", "tasks.mim.weight=0"))
    assert list(md_only.objectives) == ["mlc", "distill"] and md_only.weights == {"distill": 10.0}
    assert md_only.has_unused_parameters and not model.has_unused_parameters


# ----------------------------------------------------------------------------------------------
# the paper's four, composed through the registry: the same model and the same numbers


def _reference_forward(model, batch) -> dict[str, torch.Tensor]:
    """``HVPMTL.forward`` as written before the objectives were plug-ins (hard-wired four tasks)."""
    views, mask, labels = batch["views"], batch.get("mask"), batch.get("labels")
    r, w, t = model.routing, model.weights, model.tasks_cfg
    m, c, has_mim = r.masked_view, 1 - r.masked_view, "mim" in w
    need = {}
    if has_mim:
        need["mim"] = (m, True)
    if model.mlc is not None:
        need["mlc"] = (m, has_mim) if r.mlc_masked else (c, False)
    if model.swav is not None:
        need["swav_a"], need["swav_b"] = (m, has_mim and r.swav_masked), (c, False)
    keys = sorted(set(need.values()))
    x = torch.cat([views[v] for v, _ in keys])
    full_mask = torch.cat([mask if k else torch.zeros_like(mask) for _, k in keys]) if has_mim else None
    fmap, pooled = model.backbone(x, full_mask)
    B = views[0].shape[0]
    feats = {k: (fmap[i * B : (i + 1) * B], pooled[i * B : (i + 1) * B]) for i, k in enumerate(keys)}
    losses, out = {}, {}
    if model.mlc is not None:
        logits, h, memory = model.mlc(feats[need["mlc"]][0])
        out["logits"] = logits.detach()
        if "mlc" in w:
            gp, gn = t.mlc.gammas
            red = {"global_sum": "sum"}.get(t.mlc.reduction, t.mlc.reduction)
            loss = weighted_asymmetric_loss(logits, labels, t.mlc.eta, gp, gn, t.mlc.clip, red, t.mlc.detach_focusing)
            losses["mlc"] = loss * t.mlc.sum_images if t.mlc.reduction == "per_image" else loss
        if "distill" in w:
            view, masked = need["mlc"]
            with torch.no_grad():
                t_fmap, _ = model.teacher["backbone"](views[view], mask if masked else None)
                _, t_h, t_memory = model.teacher["mlc"](t_fmap)
                g_t = image_embedding(t_h, t_memory, t.distill.embedding)
            g = image_embedding(h, memory, t.distill.embedding)
            q0 = model.mlc.label_embed.weight
            q0_t = q0.detach() if t.distill.teacher_queries == "student" else model.teacher["mlc"].label_embed.weight
            temp = t.distill.temperature
            losses["distill"] = symmetric_kl(label_similarity(g, q0, temp), label_similarity(g_t, q0_t, temp))
    if model.swav is not None:
        frozen = model.iteration < t.swav.freeze_prototypes_iters
        pair = torch.cat([feats[need["swav_a"]][1], feats[need["swav_b"]][1]])
        scores, _ = model.swav(pair, freeze_prototypes=frozen)
        losses["swav"], out["swav_collapse"] = swav_loss(*scores.chunk(2), t.swav)
    if model.mim is not None:
        losses["mim"] = masked_l1_loss(model.mim(feats[need["mim"]][0]), views[m], mask)
    out["loss"] = sum(w[k] * v for k, v in losses.items())
    out.update({f"loss_{k}": v for k, v in losses.items()})
    return out


def _loss_and_grads(model, forward, batch) -> tuple[dict, dict]:
    model.zero_grad()
    torch.manual_seed(1)  # the decoder's dropout draws the same masks
    out = forward(batch)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("overrides", [
    (), ("tasks.mlc.weight=0",), ("tasks.routing.swav_masked=false",), ("tasks.mim.weight=0",),
    ("tasks.routing.mlc_masked=true", "tasks.routing.masked_view=1", "tasks.mlc.reduction=global_sum"),
    ("tasks.swav.freeze_prototypes_iters=5", "tasks.distill.teacher_queries=teacher"),
])  # fmt: skip
def test_default_objectives_give_bit_identical_losses_and_gradients(overrides):
    cfg = tiny_config(*overrides)
    model = hvpmtl.build(cfg)
    batch = make_batch(cfg)
    ref_out, ref_grads = _loss_and_grads(model, lambda b: _reference_forward(model, b), batch)
    out, grads = _loss_and_grads(model, model, batch)
    assert list(out) == list(ref_out)
    assert [k for k in ref_out if not torch.equal(out[k], ref_out[k])] == []
    assert list(grads) == list(ref_grads) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_default_model_has_the_old_state_dict_keys_and_initial_weights(tiny_cfg):
    torch.manual_seed(0)
    model = hvpmtl.build(tiny_cfg)
    torch.manual_seed(0)  # the parts in the order the hard-wired model built them
    backbone = build_backbone(tiny_cfg.backbone)
    d0, tasks = backbone.num_features, tiny_cfg.tasks
    parts = {"backbone": backbone, "mlc": Query2LabelDecoder(d0, 5, tasks.mlc), "swav": SwAVHead(d0, tasks.swav),
             "mim": SimMIMDecoder(d0, backbone.reduction)}  # fmt: skip
    expected = {f"{p}.{k}": v for p, module in parts.items() for k, v in module.state_dict().items()}
    expected |= {f"teacher.{p}.{k}": v for p in ("backbone", "mlc") for k, v in parts[p].state_dict().items()}
    state = model.state_dict()
    assert list(state) == ["_extra_state", *expected]
    assert all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_training_loop_logs_a_registered_objective(toy, tmp_path):
    from engine.conftest import TINY
    from hvpmtl.cli import main
    from hvpmtl.engine.metrics import read_metrics

    args = [*TINY, "data.train_size=32", "train.max_steps=2", "train.log_every=1", "train.grad_share_every=1",
            "tasks.toy.weight=2", f"train.output_dir={tmp_path}"]  # fmt: skip
    assert main(["pretrain", *args]) == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(r["loss_toy"] > 0 and r["toy_abs_error"] > 0 and 0 <= r["grad_share_toy"] <= 1 for r in rows)
    weights = {"mlc": 0.0016, "swav": 0.02, "mim": 1.0, "distill": 10.0, "toy": 2.0}  # cpu-tiny's
    assert rows[0]["loss"] == pytest.approx(sum(w * rows[0][f"loss_{t}"] for t, w in weights.items()), rel=1e-5)
