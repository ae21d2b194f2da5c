"""Masked image modelling (MIM): SimMIM's light decoder and the masked L1 loss, Eq. (4).

The decoder is a 1x1 convolution from the last feature map to ``stride^2 * 3`` channels followed
by a pixel shuffle, which predicts every pixel of the image; the loss reads the masked ones only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hvpmtl.backbones import probe_backbone
from hvpmtl.data.masking import upsample_mask
from hvpmtl.objectives.base import Objective, register_objective


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
    """Eq. (4): ``sum_masked |y - x| / Omega``, Omega = masked pixels x channels.

    ``pred, target: B x C x H x W`` (the target is the normalised input the encoder saw);
    ``mask: B x h x w`` bool at any granularity dividing ``H x W``.
    """
    m = upsample_mask(mask, target.shape[-2:]).unsqueeze(1).to(torch.float32)
    l1 = (pred.float() - target.float()).abs()
    return (l1 * m).sum() / (m.sum() + 1e-5) / target.shape[1]


@register_objective("mim", MIMConfig)
class MIMObjective(Objective):
    """Eq. (4) on the masked view, encoded under the SimMIM mask (``batch["mask"]``)."""

    modules = ("mim",)
    masks_pixels = True

    def build(self, model: nn.Module, num_classes: int | None) -> dict[str, nn.Module]:
        return {"mim": SimMIMDecoder(model.backbone.num_features, model.backbone.reduction)}

    def inputs(self, plan) -> dict:
        return {"mim": (plan.masked_view, True)}

    def forward(self, model: nn.Module, step, with_loss: bool) -> dict[str, torch.Tensor]:
        images, mask = step.pixels("mim")
        return {"loss": masked_l1_loss(model.mim(step.fmap("mim")), images, mask)}

    @classmethod
    def check_config(cls, cfg) -> None:
        """The mask units must tile the image (the data pipeline masks even when MIM is off) and,
        with MIM on, cover whole patches of a backbone whose stride divides the image."""
        img, mim = cfg.backbone.img_size, cfg.tasks.mim
        if mim.mask_patch_size <= 0 or img % mim.mask_patch_size:
            raise ValueError(f"tasks.mim.mask_patch_size={mim.mask_patch_size}: must divide backbone.img_size={img}")
        if not 0.0 <= mim.mask_ratio < 1.0:
            raise ValueError(f"tasks.mim.mask_ratio={mim.mask_ratio}: must be in [0, 1)")
        if mim.weight <= 0:
            return
        shape = probe_backbone(cfg.backbone)
        if mim.mask_patch_size % shape.patch_size:
            raise ValueError(
                f"tasks.mim.mask_patch_size={mim.mask_patch_size}: must be a multiple of the backbone's "
                f"patch size {shape.patch_size} (each mask unit covers whole patches)"
            )
        if img % shape.reduction:
            raise ValueError(
                f"backbone.img_size={img}: must be a multiple of the last stage's reduction {shape.reduction} "
                "(the SimMIM decoder's stride) when tasks.mim is on"
            )
