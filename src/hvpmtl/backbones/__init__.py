"""Backbones: unmodified timm ViT and Swin models behind thin masking adapters.

``build_backbone(cfg)`` creates the timm model by name (any size timm knows) and wraps it in the
adapter for its family. The adapter takes an optional boolean patch mask, replaces masked patch
embeddings by one learnable mask token before the Transformer blocks (SimMIM), and returns the
last-stage feature map ``B x d0 x H x W`` and the pooled feature ``B x d0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm

from hvpmtl.backbones.base import MaskedBackbone
from hvpmtl.backbones.swin import MaskedSwin
from hvpmtl.backbones.vit import MaskedViT

FAMILIES = {"timm.models.vision_transformer": MaskedViT, "timm.models.swin_transformer": MaskedSwin}

__all__ = ["BackboneConfig", "MaskedBackbone", "MaskedSwin", "MaskedViT", "build_backbone"]


@dataclass
class BackboneConfig:
    """A timm model name plus the few arguments that make small CPU variants of it.

    ``kwargs`` go to ``timm.create_model`` unchanged (e.g. ``{depth: 4, embed_dim: 128}``).
    """

    name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int | None = None  # override the name's patch size (ViT)
    window_size: int | None = None  # override the name's window size (Swin)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    kwargs: dict = field(default_factory=dict)

    def validate(self, prefix: str = "") -> None:
        if not timm.is_model(self.name):
            raise ValueError(f"{prefix}.name: '{self.name}' is not a timm model name")


def build_backbone(cfg: BackboneConfig) -> MaskedBackbone:
    """Create ``cfg.name`` with timm (no pretrained weights, no classifier) and wrap it."""
    kwargs = dict(cfg.kwargs)
    kwargs.update(img_size=cfg.img_size, num_classes=0, drop_path_rate=cfg.drop_path_rate)
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.window_size is not None:
        kwargs["window_size"] = cfg.window_size
    module = timm.models.model_entrypoint(cfg.name).__module__
    if module not in FAMILIES:
        raise ValueError(
            f"backbone.name: '{cfg.name}' comes from {module}; supported families are "
            "timm's vision_transformer (ViT) and swin_transformer (Swin)"
        )
    model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return FAMILIES[module](model)
