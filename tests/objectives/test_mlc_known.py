"""MLC on partly tagged data: a known-mask (``B x 1`` per image or ``B x C`` per element) leaves
unknown elements out of the weighted asymmetric loss, and its normalisation counts known elements
of the whole global batch however it is cut into processes and micro-batches."""

import pytest
import torch

from hvpmtl.objectives.mlc import known_counts, weighted_asymmetric_loss

REDUCTIONS = ("query2label", "per_image", "mean", "sum")
B, C = 8, 5


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g) * 2
    targets = (torch.rand(B, C, generator=g) < 0.4).float()
    return logits, targets


def _loss(logits, targets, reduction, known=None, counts=None):
    return weighted_asymmetric_loss(logits, targets, reduction=reduction, known=known, known_counts=counts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unknown_images_are_left_out(reduction):
    logits, targets = _batch()
    tagged = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    x = logits.clone().requires_grad_(True)
    loss = _loss(x, targets, reduction, known=tagged[:, None])
    loss.backward()
    # the same as the loss of the tagged images alone
    assert loss.item() == pytest.approx(_loss(logits[tagged], targets[tagged], reduction).item(), rel=1e-6)
    assert (x.grad[~tagged] == 0).all() and (x.grad[tagged] != 0).any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_per_element_mask_averages_over_known_elements(reduction):
    logits, targets = _batch(1)
    known = torch.rand(B, C, generator=torch.Generator().manual_seed(2)) < 0.6
    known[3] = False  # an image with no known class
    x = logits.clone().requires_grad_(True)
    loss = _loss(x, targets, reduction, known=known)
    loss.backward()
    terms = _loss(logits.reshape(-1, 1), targets.reshape(-1, 1), "sum", known=known.reshape(-1, 1))
    by_hand = {
        "sum": terms,
        "mean": terms / known.sum(),
        "query2label": terms / known.sum() * 1000,
        "per_image": terms / known.any(1).sum(),
    }[reduction]
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert (x.grad[~known] == 0).all() and (x.grad[known] != 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_batch_without_known_elements_gives_zero_loss_and_gradient(reduction):
    logits, targets = _batch()
    x = logits.clone().requires_grad_(True)
    loss = _loss(x, targets, reduction, known=torch.zeros(B, 1, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all() and (x.grad == 0).all()
    shard = known_counts(torch.zeros(B, 1, dtype=torch.bool), C)  # also with the engine's counts of 0
    assert _loss(logits, targets, reduction, torch.zeros(B, 1, dtype=torch.bool), shard).item() == 0.0


def test_all_known_is_the_plain_loss():
    logits, targets = _batch()
    for reduction in REDUCTIONS:
        plain = _loss(logits, targets, reduction)
        masked = _loss(logits, targets, reduction, known=torch.ones(B, 1, dtype=torch.bool))
        assert masked.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ("query2label", "per_image", "mean"))
@pytest.mark.parametrize("per_element", (False, True))
def test_shards_with_global_counts_give_the_whole_batch_gradient(reduction, per_element):
    """2 processes x 2 micro-batches of 2 images: each shard's loss normalised by the global
    counts / 4, divided by the 4 shards as the engine does for mean losses (accumulation divides
    by accum_steps, DDP averages over processes), sums to the one-batch loss and gradient."""
    logits, targets = _batch(3)
    g = torch.Generator().manual_seed(4)
    known = torch.rand(B, C, generator=g) < 0.5 if per_element else (torch.rand(B, 1, generator=g) < 0.5)
    known[:2] = False  # one shard with nothing known
    whole = logits.clone().requires_grad_(True)
    (ref := _loss(whole, targets, reduction, known)).backward()
    parts = logits.clone().requires_grad_(True)
    shards = [slice(i, i + 2) for i in range(0, B, 2)]
    counts = sum(known_counts(known[s], C) for s in shards) / len(shards)  # the all-reduce, per shard
    total = sum(_loss(parts[s], targets[s], reduction, known[s], counts) / len(shards) for s in shards)
    total.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-5, atol=1e-7)


def test_local_means_would_not_be_the_global_mean():
    """Why the counts travel: with uneven known counts per shard, the mean of per-shard means
    differs from the mean over the global batch's known elements."""
    logits, targets = _batch(3)
    known = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)[:, None]
    ref = _loss(logits, targets, "mean", known)
    halves = [slice(0, 4), slice(4, 8)]
    local = sum(_loss(logits[s], targets[s], "mean", known[s]) for s in halves) / 2
    assert local.item() != pytest.approx(ref.item(), rel=1e-3)


def test_known_counts_are_elements_and_images():
    known = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    assert known_counts(known, 3).tolist() == [3.0, 2.0]
    assert known_counts(torch.tensor([[True], [False]]), 4).tolist() == [4.0, 1.0]  # B x 1: whole rows
