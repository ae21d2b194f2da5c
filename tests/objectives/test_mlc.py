"""Weighted asymmetric loss (Eq. 1) against hand-computed values, and the Query2Label decoder."""

import math

import pytest
import torch

from hvpmtl.objectives.mlc import MLCConfig, Query2LabelDecoder, weighted_asymmetric_loss

LN3 = math.log(3.0)
# Two images, two classes; class 0 positive, class 1 negative in both.
LOGITS = torch.tensor([[0.0, LN3], [LN3, 0.0]])
TARGETS = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
# Paper values eta=10, g+=4, g-=1, each term written out:
#   pos, x=0   (p=.5):  10 * .5^4  * ln 2          = 0.4332170
#   neg, x=ln3 (p=.75): .75        * -ln .25       = 1.0397208
#   pos, x=ln3 (p=.75): 10 * .25^4 * -ln .75       = 0.0112376
#   neg, x=0   (p=.5):  .5         * ln 2          = 0.3465736
PAPER_TERMS = [0.4332170, 1.0397208, 0.0112376, 0.3465736]


def test_paper_values_sum_and_mean():
    loss = weighted_asymmetric_loss(LOGITS, TARGETS, eta=10, gamma_pos=4, gamma_neg=1)
    assert loss.item() == pytest.approx(sum(PAPER_TERMS), rel=1e-5)
    mean = weighted_asymmetric_loss(LOGITS, TARGETS, eta=10, gamma_pos=4, gamma_neg=1, reduction="mean")
    assert mean.item() == pytest.approx(sum(PAPER_TERMS) / 4, rel=1e-5)
    per_image = weighted_asymmetric_loss(LOGITS, TARGETS, eta=10, gamma_pos=4, gamma_neg=1, reduction="per_image")
    assert per_image.item() == pytest.approx(sum(PAPER_TERMS) / 2, rel=1e-5)  # classes summed, 2 images averaged


def test_query2label_reduction_is_the_element_mean_times_1000():
    # Query2Label's AsymmetricLossOptimized: -loss.sum() / B / C * 1000, here B = C = 2
    q2l = weighted_asymmetric_loss(LOGITS, TARGETS, eta=10, gamma_pos=4, gamma_neg=1, reduction="query2label")
    assert q2l.item() == pytest.approx(sum(PAPER_TERMS) / 2 / 2 * 1000, rel=1e-5)
    # at the paper's alpha_1 = 0.001 the factor cancels: alpha_1 * L_mlc is the per-element mean
    mean = weighted_asymmetric_loss(LOGITS, TARGETS, eta=10, gamma_pos=4, gamma_neg=1, reduction="mean")
    assert (MLCConfig().weight * q2l).item() == pytest.approx(mean.item(), rel=1e-6)


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction 'avg'"):
        weighted_asymmetric_loss(LOGITS, TARGETS, reduction="avg")
    with pytest.raises(ValueError, match="tasks.mlc.reduction"):
        MLCConfig(reduction="avg").validate("tasks.mlc")


def test_default_reduction_is_query2labels():
    cfg = MLCConfig()
    cfg.validate("tasks.mlc")
    assert (cfg.reduction, cfg.weight) == ("query2label", 0.001)


def test_probability_clip_shifts_negatives_only():
    # clip 0.05: neg x=ln3 -> p_m=.70: .70 * -ln .30 = 0.8427810; neg x=0 -> p_m=.45: .45 * -ln .55 = 0.2690267
    loss = weighted_asymmetric_loss(LOGITS, TARGETS, eta=10, gamma_pos=4, gamma_neg=1, clip=0.05)
    expected = 0.4332170 + 0.8427810 + 0.0112376 + 0.2690267
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_asl_order_option():
    cfg = MLCConfig(focusing="asl")
    assert cfg.gammas == (0.0, 4.0)
    assert MLCConfig().gammas == (4.0, 1.0)
    assert MLCConfig(focusing="asl", gamma_pos=1.0).gammas == (1.0, 4.0)
    # pos x=0: 10 ln 2 = 6.9314718; neg x=ln3: .75^4 ln 4 = 0.4386330
    loss = weighted_asymmetric_loss(LOGITS[:1], TARGETS[:1], 10, *cfg.gammas)
    assert loss.item() == pytest.approx(6.9314718 + 0.4386330, rel=1e-5)


def test_gradient_signs():
    x = LOGITS.clone().requires_grad_(True)
    weighted_asymmetric_loss(x, TARGETS).backward()
    assert x.grad.shape == x.shape
    assert (x.grad[:, 0] < 0).all(), "raising a positive's logit must lower the loss"
    assert (x.grad[:, 1] > 0).all(), "raising a negative's logit must raise the loss"


def test_eta_weighs_positives():
    y = torch.ones(1, 1)
    x = torch.zeros(1, 1)
    assert weighted_asymmetric_loss(x, y, eta=10).item() == pytest.approx(
        10 * weighted_asymmetric_loss(x, y, eta=1).item(), rel=1e-6
    )


def test_extreme_logits_stay_finite():
    x = torch.tensor([[-100.0, 100.0]], requires_grad=True)
    loss = weighted_asymmetric_loss(x, torch.tensor([[1.0, 0.0]]), clip=0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_decoder_per_class_readout_and_any_feature_size():
    cfg = MLCConfig(dim=16, num_heads=2, ffn_dim=32, num_layers=2, dropout=0.0)
    dec = Query2LabelDecoder(in_dim=24, num_classes=5, cfg=cfg).eval()
    for h, w in [(7, 7), (3, 5)]:  # position encoding follows the actual feature-map size
        logits, feats, memory = dec(torch.randn(2, 24, h, w))
        assert logits.shape == (2, 5) and feats.shape == (2, 5, 16) and memory.shape == (2, h * w, 16)
        manual = torch.einsum("bcd,cd->bc", feats, dec.cls_weight) + dec.cls_bias
        torch.testing.assert_close(logits, manual)
    assert dec.input_proj.in_channels == 24 and dec.input_proj.out_channels == 16


def test_decoder_queries_do_not_attend_to_each_other_by_default():
    cfg = MLCConfig(dim=16, num_heads=2, ffn_dim=32, num_layers=1, dropout=0.0)
    dec = Query2LabelDecoder(24, 4, cfg).eval()
    fmap = torch.randn(1, 24, 4, 4)
    logits, _, _ = dec(fmap)
    with torch.no_grad():
        dec.label_embed.weight[3].add_(1.0)  # change one label's query
    logits2, _, _ = dec(fmap)
    torch.testing.assert_close(logits[:, :3], logits2[:, :3])  # the others are unaffected
    assert not torch.allclose(logits[:, 3], logits2[:, 3])
    with_self = Query2LabelDecoder(24, 4, MLCConfig(dim=16, num_heads=2, ffn_dim=32, num_layers=1, self_attn=True))
    assert with_self.layers[0].self_attn is not None and dec.layers[0].self_attn is None


@pytest.mark.parametrize("detach", [False, True])
def test_focusing_weights_gradient_as_written_or_detached(detach):
    """d/dx of one positive and one negative term, by hand (p = sigmoid(x), d log p/dx = 1 - p):
    positive -eta (1-p)^g log p: detached -eta (1-p)^(g+1); as written + eta g p (1-p)^g log p;
    negative -p^g log(1-p): detached p^(g+1); as written - g p^g (1-p) log(1-p)."""
    eta, gp, gn = 10.0, 4.0, 1.0
    x = torch.tensor([[0.3, -0.7]], requires_grad=True)
    weighted_asymmetric_loss(x, torch.tensor([[1.0, 0.0]]), eta, gp, gn, detach_focusing=detach).backward()
    p = torch.sigmoid(x.detach())[0]
    pos = -eta * (1 - p[0]) ** (gp + 1)
    neg = p[1] ** (gn + 1)
    if not detach:
        pos = pos + eta * gp * p[0] * (1 - p[0]) ** gp * torch.log(p[0])
        neg = neg - gn * p[1] ** gn * (1 - p[1]) * torch.log(1 - p[1])
    assert x.grad[0].tolist() == pytest.approx([pos.item(), neg.item()], rel=1e-5)


def test_detaching_keeps_the_loss_value():
    x = torch.randn(3, 5)
    y = (torch.rand(3, 5) > 0.5).float()
    a = weighted_asymmetric_loss(x, y, detach_focusing=True)
    assert a.item() == pytest.approx(weighted_asymmetric_loss(x, y).item(), rel=1e-6)


def test_runs_saved_with_the_old_sum_reduction_still_load():
    from hvpmtl.config import Config, from_dict

    cfg = from_dict(Config, {"tasks": {"mlc": {"reduction": "sum"}}})
    cfg.tasks.mlc.validate("tasks.mlc")
    assert cfg.tasks.mlc.reduction == "global_sum"


def test_prior_starts_every_tag_at_that_probability():
    torch.manual_seed(0)
    cfg = MLCConfig(dim=32, num_heads=4, ffn_dim=64, num_layers=1, dropout=0.0, prior=0.01)
    dec = Query2LabelDecoder(16, 130, cfg).eval()
    assert torch.allclose(dec.cls_bias, torch.full((130,), math.log(0.01 / 0.99)))
    probs = dec(torch.randn(4, 16, 4, 4))[0].sigmoid()
    assert probs.mean() < 0.05  # Query2Label's uniform init starts every tag near 0.5
    default = Query2LabelDecoder(16, 130, MLCConfig(dim=32, num_heads=4, ffn_dim=64, num_layers=1)).eval()
    assert default(torch.randn(4, 16, 4, 4))[0].sigmoid().mean() > 0.2


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.5])
def test_prior_outside_the_open_unit_interval_is_refused(prior):
    with pytest.raises(ValueError, match=r"\.prior="):
        MLCConfig(prior=prior).validate("tasks.mlc")
