"""Masking adapter for timm's VisionTransformer."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from hvpmtl.backbones.base import MaskedBackbone


class MaskedViT(MaskedBackbone):
    """ViT whose masked patch embeddings become the mask token before the class token and the
    position embedding are added (SimMIM's ViT variant). The feature map is the final normed
    patch tokens on their grid; the pooled feature is timm's own pooling (class token by default).
    """

    timm_class = VisionTransformer

    def __init__(self, model: VisionTransformer):
        super().__init__(model, model.embed_dim)
        self.num_features = model.num_features
        self.patch_size = model.patch_embed.patch_size[0]
        self.reduction = self.patch_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        B, _, H, W = x.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        tokens = m.patch_embed(x)
        grid = tokens if tokens.ndim == 4 else tokens.view(B, gh, gw, -1)  # dynamic_img_size: NHWC
        grid = self.apply_mask(grid, mask)
        tokens = grid if tokens.ndim == 4 else grid.flatten(1, 2)
        tokens = m.norm_pre(m.patch_drop(m._pos_embed(tokens)))
        if m.grad_checkpointing and self.training:
            from timm.models._manipulate import checkpoint_seq

            tokens = checkpoint_seq(m.blocks, tokens)
        else:
            tokens = m.blocks(tokens)
        tokens = m.norm(tokens)
        pooled = m.forward_head(tokens, pre_logits=True)
        fmap = tokens[:, m.num_prefix_tokens :].transpose(1, 2).reshape(B, -1, gh, gw)
        return fmap, pooled
