"""Sinkhorn-Knopp (marginals, truncation) and the swapped-prediction loss (Eqs. 2-3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hvpmtl.objectives.swav import SwAVConfig, SwAVHead, sinkhorn, swapped_prediction_loss


def _scores(b=32, k=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


@pytest.mark.parametrize("stabilize", ["truncate", "max_shift", "none"])
def test_sinkhorn_marginals(stabilize):
    scores = _scores()
    q = sinkhorn(scores, epsilon=0.05, iterations=200, stabilize=stabilize)
    B, K = scores.shape
    torch.testing.assert_close(q.sum(1), torch.ones(B))  # each image: a distribution over prototypes
    torch.testing.assert_close(q.sum(0), torch.full((K,), B / K), rtol=1e-3, atol=1e-3)  # equal partition
    assert (q >= 0).all()


def test_sinkhorn_three_iterations_near_equipartition():
    scores = _scores(b=64, k=4)
    q = sinkhorn(scores, iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    per_proto = q.sum(0)
    assert per_proto.min() > 0.5 * 64 / 4 and per_proto.max() < 1.5 * 64 / 4


def test_truncation_keeps_overflowing_scores_finite():
    scores = _scores() * 10.0  # scores/eps up to 200: exp overflows float32 (> 88.7)
    untruncated = sinkhorn(scores, epsilon=0.05, stabilize="none")
    truncated = sinkhorn(scores, epsilon=0.05, stabilize="truncate", t_max=10.0)
    assert not torch.isfinite(untruncated).all()
    assert torch.isfinite(truncated).all()
    torch.testing.assert_close(truncated.sum(1), torch.ones(scores.shape[0]))
    # truncation == exponentiating the clamped input
    clamped = sinkhorn(torch.clamp(scores / 0.05, max=10.0), epsilon=1.0, stabilize="none")
    torch.testing.assert_close(truncated, clamped)


def test_max_shift_gives_swavs_codes_without_overflow_or_underflow():
    scores = _scores(b=64, k=8)
    # where the plain version is finite, the log-domain version gives the same codes ...
    torch.testing.assert_close(sinkhorn(scores, 0.05, stabilize="max_shift"), sinkhorn(scores, 0.05, stabilize="none"))
    # ... while truncation at T_max = 10 saturates every cosine above 0.5 and moves the codes
    assert (sinkhorn(scores, 0.05, stabilize="truncate") - sinkhorn(scores, 0.05, stabilize="none")).abs().max() > 0.1
    # at eps = 0.005, scores/eps spans [-200, 200]: exp overflows (none) and, after a plain max
    # shift, whole prototypes would underflow to 0 (0/0 = NaN); the log domain stays exact
    q = sinkhorn(scores, 0.005, iterations=500, stabilize="max_shift")
    assert not torch.isfinite(sinkhorn(scores, 0.005, stabilize="none")).all()
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 8.0), rtol=1e-3, atol=1e-3)


def test_sinkhorn_runs_in_fp32_for_half_inputs():
    q = sinkhorn(_scores().to(torch.bfloat16))
    assert q.dtype == torch.float32 and torch.isfinite(q).all()


def test_swapped_prediction_hand_computed():
    # K=2, tau=1. softmax([0, ln3]) = [.25, .75], code_b = [1, 0] -> -ln .25 = 1.3862944
    # softmax([0, 0]) = [.5, .5], code_a = [.2, .8] -> ln 2 = 0.6931472
    sa, sb = torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)
    qa, qb = torch.tensor([[0.2, 0.8]]), torch.tensor([[1.0, 0.0]])
    loss = swapped_prediction_loss(sa, sb, qa, qb, temperature=1.0)
    assert loss.item() == pytest.approx(1.3862944 + 0.6931472, rel=1e-6)


def test_swapped_prediction_gradient_moves_towards_code():
    sa = torch.zeros(1, 3, requires_grad=True)
    q = torch.tensor([[0.0, 1.0, 0.0]])
    swapped_prediction_loss(sa, torch.zeros(1, 3), q, q, temperature=0.1).backward()
    assert sa.grad[0, 1] < 0 and sa.grad[0, 0] > 0 and sa.grad[0, 2] > 0


def test_head_normalises_features_and_prototypes():
    head = SwAVHead(12, SwAVConfig(hidden_dim=16, out_dim=8, num_prototypes=5))
    with torch.no_grad():
        head.prototypes.weight.mul_(3.0)
    head.normalize_prototypes()
    torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(5))
    scores, z = head(torch.randn(4, 12))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert scores.shape == (4, 5) and scores.abs().max() <= 1.0 + 1e-5  # cosine scores


def test_frozen_prototypes_get_a_zero_gradient():
    head = SwAVHead(12, SwAVConfig(hidden_dim=16, out_dim=8, num_prototypes=5))
    x = torch.randn(4, 12)
    frozen, _ = head(x, freeze_prototypes=True)
    frozen.square().sum().backward()
    assert torch.count_nonzero(head.prototypes.weight.grad) == 0
    assert head.projection[0].weight.grad.abs().sum() > 0
    head.zero_grad()
    free, _ = head(x)
    torch.testing.assert_close(free, frozen)  # same scores, only the gradient differs
    free.square().sum().backward()
    assert head.prototypes.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stabilize", ["truncate", "max_shift", "none"])
def test_queued_rows_join_the_partition_and_only_the_batch_gets_codes(stabilize):
    batch, queue = _scores(b=8, k=16, seed=1), _scores(b=40, k=16, seed=2)
    q = sinkhorn(batch, 0.05, iterations=200, stabilize=stabilize, queue_scores=queue)
    whole = sinkhorn(torch.cat([queue, batch]), 0.05, iterations=200, stabilize=stabilize)
    torch.testing.assert_close(q, whole[-8:])  # the batch's rows of one Sinkhorn over queue + batch
    torch.testing.assert_close(q.sum(1), torch.ones(8))
    # 8 images cannot fill 16 prototypes equally; with the queue the 48 rows do, so codes differ
    assert (q - sinkhorn(batch, 0.05, iterations=200, stabilize=stabilize)).abs().max() > 0.05


def test_queue_is_fifo_per_view_newest_first_and_persists():
    head = SwAVHead(8, SwAVConfig(hidden_dim=16, out_dim=4, num_prototypes=5, queue_length=6))
    assert head.queue.shape == (2, 6, 4) and head.queue_filled == 0
    first, second = torch.arange(32.0).view(2, 4, 4), 100 + torch.arange(32.0).view(2, 4, 4)
    head.push(first[0], first[1])
    assert head.queue_filled == 0  # the forward pushes; the count follows outside it
    head.count_pushed(4)
    assert head.queue_filled == 4 and torch.equal(head.queue[:, :4], first) and not head.queue[:, 4:].any()
    head.push(second[0], second[1])
    head.count_pushed(4)
    assert head.queue_filled == 6 and int(head.queue_rows) == 6
    assert torch.equal(head.queue[:, :4], second) and torch.equal(head.queue[:, 4:], first[:, :2])
    copy = SwAVHead(8, SwAVConfig(hidden_dim=16, out_dim=4, num_prototypes=5, queue_length=6))
    copy.load_state_dict(head.state_dict())  # queue and fill level travel in checkpoints
    assert copy.queue_filled == 6 and torch.equal(copy.queue, head.queue)
