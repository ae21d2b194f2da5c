"""Backbones: unmodified timm ViT and Swin models behind thin masking adapters.

``build_backbone(cfg)`` creates the timm model by name (any size timm knows) and wraps it in the
adapter for its family. The adapter takes an optional boolean patch mask, replaces masked patch
embeddings by one learnable mask token before the Transformer blocks (SimMIM), and returns the
last-stage feature map ``B x d0 x H x W`` and the pooled feature ``B x d0``. The config is checked
when it loads: ``kwargs`` against the timm constructor, and the sizes by a build on the meta device.
``build_backbone`` gives the random initialisation; the weights a run starts from (timm's cached
pretrained weights, a local file, a previous run) are loaded by ``load_start_weights``
(``backbones/pretrained.py``), never at config load.
"""

from __future__ import annotations

from collections.abc import Callable
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
from hvpmtl.backbones.pretrained import PARTS, SUFFIXES, load_start_weights, pretrained_cfg
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
    "load_start_weights",
    "probe_backbone",
]


@dataclass
class BackboneConfig:
    """A timm model name plus the few arguments that make small CPU variants of it.

    ``kwargs`` go to ``timm.create_model`` unchanged (e.g. ``{depth: 4, embed_dim: 128}``); each
    must be an argument of the timm model's constructor, of its annotated type.

    Start weights (at most one of ``pretrained``, ``pretrained_file``, ``init_from``; none: random
    initialisation seeded by ``train.seed``) are loaded once, when a new run builds its model; the
    EMA teacher starts as a copy of the loaded student. ``init_from`` starts a *new* run (step 0,
    fresh optimiser, schedules and heads) from a previous run's backbone weights; ``--resume`` /
    ``train.resume`` instead *continues* a run exactly from its checkpoint (weights, optimiser,
    step, random state) and never reads the start weights again.
    """

    name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int | None = None  # override the name's patch size (ViT)
    window_size: int | None = None  # override the name's window size (Swin)
    drop_path_rate: float = 0.0
    # widths of 3x3 convolutions (LayerNorm, GELU) before the patch projection (ViT only); empty:
    # timm's linear patch embedding, as the paper. See backbones/factory.py:conv_stem
    stem_channels: list[int] = field(default_factory=list)
    grad_checkpointing: bool = False
    kwargs: dict = field(default_factory=dict)
    pretrained: bool = False  # timm's weights for `name` from the local Hugging Face / torch hub cache (no download)
    pretrained_file: str = ""  # a local timm state dict: .safetensors, or .pth/.pt/.bin (read weights-only)
    # a previous hvpmtl run folder, checkpoint or *.safetensors: a new run from its weights (--resume continues one)
    init_from: str = ""
    init_from_part: str = "student"  # student | teacher: which backbone of init_from

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
        self._validate_start(key)
        self._validate_stem(key, prefix)
        check_timm_kwargs(self, prefix)
        patch = probe_backbone(self, prefix).patch_size
        if self.img_size % patch:
            size = f"{key('img_size')}={self.img_size}"
            if self.patch_size is not None:
                raise ValueError(f"{key('patch_size')}={patch}: must divide {size}")
            if "patch_size" in self.kwargs:
                raise ValueError(f"{key('kwargs.patch_size')}={patch}: must divide {size}")
            raise ValueError(f"{size}: must be a multiple of {self.name}'s patch size {patch}")

    def _validate_stem(self, key: Callable[[str], str], prefix: str) -> None:
        """A convolutional stem: positive widths, a ViT, and no pretrained weights (timm's have a
        linear patch embedding; ``init_from`` a run with the same stem is fine)."""
        if not self.stem_channels:
            return
        if any(not isinstance(c, int) or c <= 0 for c in self.stem_channels):
            raise ValueError(f"{key('stem_channels')}={self.stem_channels}: expected positive integers")
        if adapter_for(self.name, prefix) is not MaskedViT:
            raise ValueError(f"{key('stem_channels')}: a convolutional stem needs a ViT, not '{self.name}'")
        for name in ("pretrained", "pretrained_file"):
            if getattr(self, name):
                raise ValueError(
                    f"{key('stem_channels')}: {key(name)} has a linear patch embedding that does not fit a "
                    "convolutional stem; set stem_channels=[] or start from random weights"
                )

    def _validate_start(self, key: Callable[[str], str]) -> None:
        """The start-weight keys: one source at most, a known part, a readable suffix, weights timm
        knows of (files are looked for only when the weights load: a run's config is also read elsewhere)."""
        chosen = [name for name in ("pretrained", "pretrained_file", "init_from") if getattr(self, name)]
        if len(chosen) > 1:
            raise ValueError(f"{', '.join(key(n) for n in chosen)}: set one start for the weights, not {len(chosen)}")
        if self.init_from_part not in PARTS:
            raise ValueError(f"{key('init_from_part')}={self.init_from_part!r}: choose student or teacher")
        if self.pretrained_file and not self.pretrained_file.endswith(SUFFIXES):
            raise ValueError(f"{key('pretrained_file')}={self.pretrained_file}: expected one of {', '.join(SUFFIXES)}")
        if self.pretrained and pretrained_cfg(self.name) is None:
            raise ValueError(f"{key('pretrained')}=true: timm has no pretrained weights for '{self.name}'")


def build_backbone(cfg: BackboneConfig) -> MaskedBackbone:
    """Create ``cfg.name`` with timm (random initialisation, no classifier) and wrap it; the start
    weights of ``cfg`` are not loaded here (see :func:`load_start_weights`)."""
    adapter = adapter_for(cfg.name)
    model = timm.create_model(cfg.name, pretrained=False, **timm_kwargs(cfg))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return adapter(model)
