"""Momentum distillation: label similarity (Eq. 5), symmetric KL (Eq. 6), EMA arithmetic."""

import math

import pytest
import torch

from hvpmtl.objectives.distill import ema_update, image_embedding, label_similarity, symmetric_kl


def test_label_similarity_is_softmax_of_cosines():
    g = torch.tensor([[2.0, 0.0]])  # cosine ignores the norm
    q0 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    p = label_similarity(g, q0).exp()
    e = math.e
    torch.testing.assert_close(p, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))


def test_symmetric_kl_hand_computed():
    # P_s = [.5, .5], P_t = [.25, .75]
    # KL(Ps||Pt) = .5 ln 2 + .5 ln(2/3) = 0.1438410; KL(Pt||Ps) = .25 ln .5 + .75 ln 1.5 = 0.1308120
    ls = torch.log(torch.tensor([[0.5, 0.5]]))
    lt = torch.log(torch.tensor([[0.25, 0.75]]))
    assert symmetric_kl(ls, lt).item() == pytest.approx((0.1438410 + 0.1308120) / 2, rel=1e-5)
    assert symmetric_kl(ls, ls).item() == pytest.approx(0.0, abs=1e-7)
    assert symmetric_kl(ls, lt).item() == pytest.approx(symmetric_kl(lt, ls).item(), rel=1e-6)


def test_teacher_side_gets_no_gradient():
    ls = torch.log_softmax(torch.randn(3, 4), -1).requires_grad_(True)
    lt = torch.log_softmax(torch.randn(3, 4), -1).requires_grad_(True)
    symmetric_kl(ls, lt).backward()
    assert lt.grad is None and ls.grad is not None and ls.grad.abs().sum() > 0


def test_ema_update_arithmetic():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    s = [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
    ema_update(t, s, momentum=0.9)
    torch.testing.assert_close(t[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]))
    torch.testing.assert_close(t[1], torch.tensor([[3.6]]))
    torch.testing.assert_close(s[0], torch.tensor([3.0, -2.0]))  # student untouched


def test_image_embedding_kinds():
    h, mem = torch.randn(2, 5, 8), torch.randn(2, 9, 8)
    torch.testing.assert_close(image_embedding(h, mem, "query_mean"), h.mean(1))
    torch.testing.assert_close(image_embedding(h, mem, "memory_mean"), mem.mean(1))
