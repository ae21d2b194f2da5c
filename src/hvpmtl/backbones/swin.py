"""Masking adapter for timm's SwinTransformer."""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from hvpmtl.backbones.base import MaskedBackbone


class MaskedSwin(MaskedBackbone):
    """Swin whose masked 4x4 patch embeddings become the mask token before the first stage.

    The mask arrives at the last stage's granularity (32x32 pixels by default, Sec. 3.2 of the
    paper) and is repeated onto the 4x4 patch grid. Output: the last stage's normed feature map
    and its average pool.
    """

    timm_class = SwinTransformer
    checkpoint_filter = staticmethod(checkpoint_filter_fn)

    def __init__(self, model: SwinTransformer):
        super().__init__(model, model.embed_dim)
        self.num_features = model.num_features
        self.patch_size = model.patch_embed.patch_size[0]
        self.reduction = model.feature_info[-1]["reduction"]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        tokens = self.apply_mask(m.patch_embed(x), mask)  # B x H x W x C (NHWC)
        tokens = m.norm(m.layers(tokens))
        pooled = m.forward_head(tokens, pre_logits=True)
        return tokens.permute(0, 3, 1, 2), pooled
