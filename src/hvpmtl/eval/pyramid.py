"""Multi-scale features of a pre-trained backbone, for detection and segmentation.

* **Swin**: its four stages (strides 4, 8, 16, 32 for patch 4) from timm's
  ``forward_intermediates``, each with its own LayerNorm (as Swin's detection and segmentation
  backbones add one per output stage).
* **ViT**: a simple feature pyramid (ViTDet, Li et al. 2022, Fig. 2c): the last feature map at
  stride ``p`` is up-sampled x4 and x2 by transposed convolutions, kept, and max-pooled x0.5,
  then each level is projected to ``out_channels`` by a 1x1 and a 3x3 convolution with
  LayerNorm. Strides ``p/4, p/2, p, 2p`` (4, 8, 16, 32 for ViT-B/16).

The backbone accepts any input size: ViT with timm's ``dynamic_img_size`` (position embedding
interpolated), Swin with ``strict_img_size=False`` (windows padded).
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from hvpmtl.backbones import MaskedBackbone, MaskedSwin, MaskedViT
from hvpmtl.eval.weights import Weights, build_masked_backbone


def build_dense_backbone(weights: Weights, img_size: int, drop_path: float = 0.0) -> MaskedBackbone:
    """The backbone of ``weights`` built for dense prediction at ``img_size`` (any input size)."""
    kwargs = dict(weights.backbone.kwargs)
    family = "swin" if "swin" in weights.backbone.name else "vit"
    kwargs.update({"strict_img_size": False} if family == "swin" else {"dynamic_img_size": True})
    backbone = build_masked_backbone(weights, img_size=img_size, drop_path_rate=drop_path, kwargs=kwargs)
    backbone.mask_token.requires_grad_(False)  # no masking downstream (and DDP wants every trainable param used)
    return backbone


class SwinStages(nn.Module):
    """The four Swin stages as ``NCHW`` maps, each layer-normed."""

    def __init__(self, backbone: MaskedSwin):
        super().__init__()
        self.backbone = backbone
        info = backbone.model.feature_info
        self.out_channels = [int(i["num_chs"]) for i in info]
        self.strides = [int(i["reduction"]) for i in info]
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in self.out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.backbone.model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
        return [norm(m) for norm, m in zip(self.norms, maps)]


def _conv_ln(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a ViT's last feature map (module docstring)."""

    def __init__(self, backbone: MaskedViT, out_channels: int = 256):
        super().__init__()
        self.backbone = backbone
        d, p = backbone.num_features, backbone.reduction
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(d, d // 2, 2, stride=2),
                    LayerNorm2d(d // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2),
                ),  # fmt: skip
                nn.ConvTranspose2d(d, d // 2, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2),
            ]
        )
        dims = (d // 4, d // 2, d, d)
        self.project = nn.ModuleList(
            nn.Sequential(_conv_ln(c, out_channels, 1), _conv_ln(out_channels, out_channels, 3)) for c in dims
        )
        self.out_channels = [out_channels] * 4
        self.strides = [max(p // 4, 1), max(p // 2, 1), p, 2 * p]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        fmap, _ = self.backbone(x)
        return [proj(scale(fmap)) for scale, proj in zip(self.scales, self.project)]


def build_pyramid(backbone: MaskedBackbone, kind: str = "auto", out_channels: int = 256) -> nn.Module:
    """Four maps, finest first, with ``.out_channels`` and ``.strides`` lists.

    ``kind``: ``auto`` (Swin: its stages; ViT: simple pyramid) or ``simple`` (the simple pyramid
    over the last map, for either family).
    """
    if kind not in ("auto", "simple"):
        raise ValueError(f"pyramid: choose auto or simple, got '{kind}'")
    if isinstance(backbone, MaskedSwin) and kind == "auto":
        return SwinStages(backbone)
    return SimpleFeaturePyramid(backbone, out_channels)
