"""Masking adapter for timm's VisionTransformer."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from hvpmtl.backbones.base import MaskedBackbone


class MaskedViT(MaskedBackbone):
    """ViT whose masked patch embeddings become the mask token before the class token and the
    position embedding are added (SimMIM's ViT variant). The feature map is the final normed
    patch tokens on their grid; the pooled feature is timm's own pooling (class token by default).

    The model runs through timm's public ``forward_features``; the mask is applied by a forward
    hook on its ``patch_embed``, so timm's own position embedding, patch dropout and gradient
    checkpointing are used unchanged.
    """

    timm_class = VisionTransformer
    checkpoint_filter = staticmethod(checkpoint_filter_fn)

    def __init__(self, model: VisionTransformer):
        super().__init__(model, model.embed_dim)
        self.num_features = model.num_features
        self.patch_size = model.patch_embed.patch_size[0]
        self.reduction = self.patch_size
        self._mask: torch.Tensor | None = None  # set for the length of one forward
        model.patch_embed.register_forward_hook(self._mask_patches)

    def _mask_patches(self, module, inputs, tokens: torch.Tensor) -> torch.Tensor:
        """Forward hook: the patch embeddings with masked ones replaced by the mask token."""
        if self._mask is None:
            return tokens
        B, _, H, W = inputs[0].shape
        grid = tokens if tokens.ndim == 4 else tokens.view(B, H // self.patch_size, W // self.patch_size, -1)
        grid = self.apply_mask(grid, self._mask)  # dynamic_img_size gives NHWC already
        return grid if tokens.ndim == 4 else grid.flatten(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        gh, gw = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        self._mask = mask
        try:
            tokens = m.forward_features(x)
        finally:
            self._mask = None
        pooled = m.forward_head(tokens, pre_logits=True)
        fmap = tokens[:, m.num_prefix_tokens :].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        return fmap, pooled
