"""Masked image modelling (MIM): SimMIM's light decoder and the masked L1 loss, Eq. (3).

The decoder is a 1x1 convolution from the last feature map to ``stride^2 * 3`` channels followed
by a pixel shuffle, which predicts every pixel of the image; the loss reads the masked ones only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hvpmtl.data.masking import upsample_mask


@dataclass
class MIMConfig:
    """SimMIM decoder and masking; mask unit 32x32 is the paper's, ratio 0.6 is SimMIM's."""

    weight: float = 1.0  # alpha_3
    mask_patch_size: int = 32
    mask_ratio: float = 0.6


class SimMIMDecoder(nn.Module):
    """Feature map ``B x d0 x h x w`` -> reconstruction ``B x 3 x (h*stride) x (w*stride)``."""

    def __init__(self, in_dim: int, stride: int, out_chans: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, stride * stride * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(fmap))


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. (3): ``sum_masked |y - x| / Omega``, Omega = masked pixels x channels.

    ``pred, target: B x C x H x W`` (the target is the normalised input the encoder saw);
    ``mask: B x h x w`` bool at any granularity dividing ``H x W``.
    """
    m = upsample_mask(mask, target.shape[-2:]).unsqueeze(1).to(torch.float32)
    l1 = (pred.float() - target.float()).abs()
    return (l1 * m).sum() / (m.sum() + 1e-5) / target.shape[1]
