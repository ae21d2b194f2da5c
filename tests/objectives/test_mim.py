"""SimMIM decoder and the masked L1 loss (Eq. 4)."""

import pytest
import torch

from hvpmtl.objectives.mim import SimMIMDecoder, masked_l1_loss


def test_masked_l1_hand_computed():
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, -2.0], [-3.0, -4.0]]]])  # 1 x 2 x 2 x 2
    mask = torch.tensor([[[True, False], [False, True]]])
    # masked pixels (0,0), (1,1): |1| + |4| + |-1| + |-4| = 10; / 2 masked pixels / 2 channels = 2.5
    loss = masked_l1_loss(torch.zeros_like(target), target, mask)
    assert loss.item() == pytest.approx(2.5, rel=1e-5)


def test_unmasked_pixels_do_not_count():
    target = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[:, 0, 0] = True  # top-left 4x4 block of each image
    pred = target.clone()
    pred[:, :, 4:, :] += 100.0  # wrong only where nothing is masked
    assert masked_l1_loss(pred, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred[:, :, :4, :4] += 1.0
    assert masked_l1_loss(pred, target, mask).item() == pytest.approx(1.0, rel=1e-4)


def test_gradient_only_on_masked_pixels():
    target = torch.randn(1, 3, 8, 8)
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 1, 1] = True
    pred = torch.zeros_like(target, requires_grad=True)
    masked_l1_loss(pred, target, mask).backward()
    assert (pred.grad[..., 4:, 4:] != 0).all()
    assert (pred.grad[..., :4, :] == 0).all() and (pred.grad[..., :, :4] == 0).all()


def test_decoder_predicts_full_image():
    dec = SimMIMDecoder(in_dim=32, stride=16)
    assert dec.conv.out_channels == 16 * 16 * 3
    assert dec(torch.randn(2, 32, 2, 3)).shape == (2, 3, 32, 48)
