"""Backbones: unmodified timm ViT and Swin models behind thin masking adapters.

``build_backbone(cfg)`` creates the timm model by name (any size timm knows) and wraps it in the
adapter for its family. The adapter takes an optional boolean patch mask, replaces masked patch
embeddings by one learnable mask token before the Transformer blocks (SimMIM), and returns the
last-stage feature map ``B x d0 x H x W`` and the pooled feature ``B x d0``. The config is checked
when it loads: ``kwargs`` against the timm constructor, and the sizes by a build on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm

from hvpmtl.backbones.base import MaskedBackbone
from hvpmtl.backbones.factory import (
    FAMILIES,
    BackboneShape,
    adapter_for,
    check_timm_kwargs,
    probe_backbone,
    timm_kwargs,
)
from hvpmtl.backbones.swin import MaskedSwin
from hvpmtl.backbones.vit import MaskedViT

__all__ = [
    "FAMILIES",
    "BackboneConfig",
    "BackboneShape",
    "MaskedBackbone",
    "MaskedSwin",
    "MaskedViT",
    "build_backbone",
    "probe_backbone",
]


@dataclass
class BackboneConfig:
    """A timm model name plus the few arguments that make small CPU variants of it.

    ``kwargs`` go to ``timm.create_model`` unchanged (e.g. ``{depth: 4, embed_dim: 128}``); each
    must be an argument of the timm model's constructor, of its annotated type.
    """

    name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int | None = None  # override the name's patch size (ViT)
    window_size: int | None = None  # override the name's window size (Swin)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    kwargs: dict = field(default_factory=dict)

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError`` naming ``{prefix}.field`` for a value timm cannot build or that does
        not tile the image."""

        def key(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        if not timm.is_model(self.name):
            raise ValueError(f"{key('name')}: '{self.name}' is not a timm model name")
        for name in ("img_size", "patch_size", "window_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{key(name)}={value}: must be positive")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"{key('drop_path_rate')}={self.drop_path_rate}: must be in [0, 1)")
        check_timm_kwargs(self, prefix)
        patch = probe_backbone(self, prefix).patch_size
        if self.img_size % patch:
            size = f"{key('img_size')}={self.img_size}"
            if self.patch_size is not None:
                raise ValueError(f"{key('patch_size')}={patch}: must divide {size}")
            if "patch_size" in self.kwargs:
                raise ValueError(f"{key('kwargs.patch_size')}={patch}: must divide {size}")
            raise ValueError(f"{size}: must be a multiple of {self.name}'s patch size {patch}")


def build_backbone(cfg: BackboneConfig) -> MaskedBackbone:
    """Create ``cfg.name`` with timm (no pretrained weights, no classifier) and wrap it."""
    adapter = adapter_for(cfg.name)
    model = timm.create_model(cfg.name, pretrained=False, **timm_kwargs(cfg))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return adapter(model)
