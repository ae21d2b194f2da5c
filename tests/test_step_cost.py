"""benchmarks/step_cost.py: FLOP counts of the variants follow from their backbone passes; the
naive variant shares the full model's modules; a step runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_variants import Naive, build_variant, count_flops, make_batch, make_step  # noqa: E402

from conftest import TINY_VIT  # noqa: E402

C = 5


def _flops(variant: str, preset: str | None = "cpu-micro", overrides=(), batch: int = 2) -> int:
    model, cfg = build_variant(preset, variant, C, "meta", overrides)
    return count_flops(model, make_batch(cfg, batch, C, "meta"))


def _backbone_forward_flops(preset: str = "cpu-micro", batch: int = 2) -> int:
    model, cfg = build_variant(preset, "mim", C, "meta")
    with FlopCounterMode(display=False) as counter:
        model.backbone(make_batch(cfg, batch, C, "meta")["views"][0])
    return counter.get_total_flops()


def test_flop_ratios_follow_the_backbone_passes():
    F = _backbone_forward_flops()  # one backbone forward of the batch; backward ~ 2F
    sup, hvp, naive = (_flops(v) for v in ("supervised", "hvp-mtl", "naive"))
    assert F > 0
    # supervised: 1 pass forward + backward (the image needs no gradient: the patch embedding's
    # backward is one product, not two) + a linear classifier
    assert 2.95 * F <= sup <= 3.1 * F
    # HVP-MTL: 2 student passes forward + backward, the teacher's forward, heads under 10 %
    assert 6.9 * F <= hvp <= 7.7 * F
    assert 2.3 <= hvp / sup <= 2.6
    # naive: 5 student passes (MLC, SwAV x 2, MIM, MD) + the teacher's
    assert naive >= 15.8 * F > 2 * hvp
    assert _flops("no-md") < hvp


def test_cpu_count_includes_fused_attention():
    model, cfg = build_variant(None, "supervised", C, "cpu", TINY_VIT)
    on_cpu = count_flops(model, make_batch(cfg, 2, C, "cpu"))
    meta = _flops("supervised", None, TINY_VIT)
    # CPU's fused attention is counted (custom formulas), its backward with the recomputed scores
    assert meta < on_cpu < 1.1 * meta
    assert all(p.grad is None for p in model.parameters())


def test_naive_shares_the_full_model_and_steps():
    torch.manual_seed(0)
    model, cfg = build_variant(None, "naive", C, "cpu", TINY_VIT)
    assert isinstance(model, Naive) and len(model.parts) == 4
    params = {id(p) for p in model.full.parameters()}
    assert all(id(p) in params for part in model.parts for p in part.parameters())
    batch = make_batch(cfg, 3, C, "cpu")
    mlc_part = next(p for p in model.parts if list(p.weights) == ["mlc"])
    model.eval()  # no dropout: the MLC part and the full model read the same clean view
    with torch.no_grad():
        assert mlc_part(batch)["loss_mlc"].item() == pytest.approx(model.full(batch)["loss_mlc"].item(), rel=1e-5)
    model.train()
    before = model.full.teacher["backbone"].model.patch_embed.proj.weight.clone()
    make_step(model, cfg, batch, "cpu", "fp32")()
    assert model.full.iteration == cfg.tasks.swav.freeze_prototypes_iters + 1
    assert all(p.iteration == model.full.iteration for p in model.parts)
    assert not torch.equal(before, model.full.teacher["backbone"].model.patch_embed.proj.weight)  # EMA moved


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'mdx'"):
        build_variant(None, "mdx", C, "meta", TINY_VIT)
