"""The interface every backbone adapter implements."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import trunc_normal_
from torch import nn

from hvpmtl.data.masking import upsample_mask


class MaskedBackbone(nn.Module):
    """A timm model with a SimMIM mask token.

    Attributes:
        model: the unmodified timm model.
        num_features: channels ``d0`` of the last-stage feature map.
        patch_size: pixels per token of the patch embedding (where the mask token is applied).
        reduction: pixels per cell of the last-stage feature map (the SimMIM decoder's stride).
        timm_class: the timm model class the adapter wraps (its constructor takes ``kwargs``).
        checkpoint_filter: the timm family's ``checkpoint_filter_fn(state_dict, model)`` that adapts
            pretrained weights (other formats, image, patch or window sizes); ``None``: none.
    """

    timm_class: type[nn.Module]
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None
    num_features: int
    patch_size: int
    reduction: int

    def __init__(self, model: nn.Module, embed_dim: int):
        super().__init__()
        self.model = model
        # SimMIM: zero-initialised, then truncated normal (std 0.02).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def apply_mask(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SimMIM blend ``x * (1 - w) + token * w`` on a ``B x H x W x D`` token grid.

        ``mask`` is ``B x h x w`` at any granularity that divides the token grid; it is repeated
        up to the grid (e.g. 32x32-pixel units onto 16x16-pixel ViT patches or 4x4 Swin patches).
        """
        if mask is None:
            return tokens
        w = upsample_mask(mask, tokens.shape[1:3]).unsqueeze(-1).to(tokens.dtype)
        return tokens * (1.0 - w) + self.mask_token.to(tokens.dtype) * w

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(feature_map B x d0 x H x W, pooled B x d0)``."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay."""
        inner = getattr(self.model, "no_weight_decay", lambda: set())()
        return {"mask_token"} | {f"model.{n}" for n in inner}
