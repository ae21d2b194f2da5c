"""From a backbone config to a timm model: the family's adapter, timm's keyword arguments, and an
early check that builds the model on PyTorch's meta device (no memory, no initialisation cost) so
that a wrong argument or an impossible size is reported while the config loads.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.layers import ConvNormAct, HybridEmbed, LayerNorm2d
from torch import nn

from hvpmtl.backbones.base import MaskedBackbone
from hvpmtl.backbones.swin import MaskedSwin
from hvpmtl.backbones.vit import MaskedViT
from hvpmtl.config_io import coerce_value
from hvpmtl.reprs import short_repr, short_text

if TYPE_CHECKING:
    from hvpmtl.backbones import BackboneConfig

FAMILIES: dict[str, type[MaskedBackbone]] = {
    "timm.models.vision_transformer": MaskedViT,
    "timm.models.swin_transformer": MaskedSwin,
}
# timm arguments the config sets through its own fields (None: hvpmtl fixes the value itself)
OWN_FIELDS = {
    "img_size": "img_size",
    "drop_path_rate": "drop_path_rate",
    "num_classes": None,
    "pretrained": "pretrained",
    "pretrained_cfg_overlay": "pretrained_file",
    "embed_layer": "stem_channels",
}


@dataclass(frozen=True)
class BackboneShape:
    """Pixels per token of the patch embedding and per cell of the last-stage feature map."""

    patch_size: int
    reduction: int


_shapes: dict[str, BackboneShape] = {}


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def adapter_for(name: str, prefix: str = "backbone") -> type[MaskedBackbone]:
    """The masking adapter of timm model ``name``'s family, or ``ValueError`` naming the key."""
    module = timm.models.model_entrypoint(name).__module__
    if module not in FAMILIES:
        raise ValueError(
            f"{_key(prefix, 'name')}: '{name}' comes from {module}; supported families are "
            "timm's vision_transformer (ViT) and swin_transformer (Swin)"
        )
    return FAMILIES[module]


def conv_stem(channels: list[int] | tuple[int, ...]) -> nn.Sequential:
    """3x3 stride-1 convolutions, each with LayerNorm and GELU, that run at full resolution before
    the patch projection (an early-convolution stem, Xiao et al. 2021, kept at stride 1 so the
    patch grid, the mask units and the reconstruction target are those of the linear embedding).
    Each layer lets a token see one more pixel beyond its patch, so SimMIM's visible tokens see
    that border of their masked neighbours. LayerNorm, not Xiao's BatchNorm: no batch statistics,
    so N processes equal one and the EMA teacher, which copies parameters only, needs no running
    averages."""
    layers, in_chs = [], 3
    for out_chs in channels:
        layers.append(ConvNormAct(in_chs, out_chs, 3, norm_layer=LayerNorm2d, act_layer=nn.GELU))
        in_chs = out_chs
    return nn.Sequential(*layers)


def conv_stem_embed(channels: list[int], **kwargs: Any) -> HybridEmbed:
    """timm's ``embed_layer`` for a convolutional stem: ``HybridEmbed`` (its patch projection) over
    :func:`conv_stem`, built where timm builds the embedding (so on the meta device when probed)."""
    return HybridEmbed(backbone=conv_stem(channels), **kwargs)


def timm_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(cfg.name, ...)``: no classifier, the config's sizes,
    and with ``stem_channels`` the embedding of :func:`conv_stem_embed`."""
    kwargs = dict(cfg.kwargs)
    kwargs.update(img_size=cfg.img_size, num_classes=0, drop_path_rate=cfg.drop_path_rate)
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.window_size is not None:
        kwargs["window_size"] = cfg.window_size
    if cfg.stem_channels:
        kwargs["embed_layer"] = partial(conv_stem_embed, list(cfg.stem_channels))
    return kwargs


def check_timm_kwargs(cfg: BackboneConfig, prefix: str = "backbone") -> None:
    """Every ``kwargs`` entry must be an argument of the timm model's constructor (or of
    ``timm.create_model``) with a value of its annotated type; raise naming ``<prefix>.kwargs.<key>``."""
    model_class = adapter_for(cfg.name, prefix).timm_class
    params = inspect.signature(model_class.__init__).parameters
    create_params = set(inspect.signature(timm.create_model).parameters) - {"model_name", "pretrained", "kwargs"}
    valid = sorted((set(params) - {"self"} | create_params) - set(OWN_FIELDS))
    for name, value in cfg.kwargs.items():
        key = _key(prefix, f"kwargs.{name}")
        if name in OWN_FIELDS:
            field = OWN_FIELDS[name]
            why = f"set {_key(prefix, field)} instead" if field else "hvpmtl sets it itself; remove it"
            raise ValueError(f"{key}: {why}")
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"
            raise ValueError(f"{key}: not an argument of timm's {model_class.__name__} ({hint})")
        annotation = params[name].annotation if name in params else inspect.Parameter.empty
        if annotation is not inspect.Parameter.empty and not isinstance(annotation, str):
            coerce_value(value, annotation, key)


def probe_backbone(cfg: BackboneConfig, prefix: str = "backbone") -> BackboneShape:
    """Build ``cfg``'s model and adapter on the meta device and return its patch size and
    reduction; a model timm cannot build raises ``ValueError`` naming ``prefix``. Cached."""
    cache_key = repr((cfg.name, cfg.img_size, cfg.patch_size, cfg.window_size, cfg.drop_path_rate,
                      list(cfg.stem_channels), sorted(cfg.kwargs.items(), key=lambda item: str(item[0]))))  # fmt: skip
    if cache_key not in _shapes:
        adapter = adapter_for(cfg.name, prefix)
        kwargs = timm_kwargs(cfg)
        try:
            with torch.device("meta"):
                backbone = adapter(timm.create_model(cfg.name, pretrained=False, **kwargs))
        except Exception as err:  # any failure here comes from the config's values
            shown = ", ".join(f"{k}={short_repr(v, 80)}" for k, v in kwargs.items() if k != "num_classes")
            raise ValueError(
                f"{prefix or 'backbone'}: timm cannot build {cfg.name} with {short_text(shown, 400)}: "
                f"{type(err).__name__}: {short_text(str(err))}"
            ) from err
        _shapes[cache_key] = BackboneShape(int(backbone.patch_size), int(backbone.reduction))
    return _shapes[cache_key]
