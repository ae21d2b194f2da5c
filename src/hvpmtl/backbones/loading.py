"""Timm-keyed weights loaded into a timm model, checked first: every tensor finite and floating
where the model's is, the same keys and shapes (what differs is named), a ViT's absolute position
embedding resampled to the model's grid. Run folders are read above this package (:mod:`hvpmtl.runs`).
"""

from __future__ import annotations

import torch
from torch import nn

from hvpmtl.backbones.pretrained import describe_mismatch


class WeightsError(ValueError):
    """The source cannot be read as backbone weights, or they do not fit the backbone."""


def _fit_pos_embed(state: dict, model: nn.Module) -> dict:
    """Resample a ViT's absolute position embedding to the model's grid (other image sizes)."""
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=prefix)
    return state


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], where: str, allow_missing: tuple[str, ...] = ()
) -> None:
    """Load timm-keyed ``state`` into the timm ``model``; mismatches raise :class:`WeightsError`
    naming them. Keys starting with one of ``allow_missing`` (a new head) may be missing."""
    check_tensors(state, model.state_dict(), where)
    state = _fit_pos_embed(state, model)
    problem = describe_mismatch(model.state_dict(), state, allow_missing)
    if problem is not None:
        raise WeightsError(f"{where}: the weights do not fit this backbone ({problem})")
    model.load_state_dict(state, strict=False)


def check_tensors(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str) -> None:
    """:class:`WeightsError` naming the first tensor of ``state`` that is not finite, or that is
    stored as integers where the model (state dict ``own``) holds floats: ``load_state_dict``
    would cast it silently, and either would be evaluated as if it were trained weights."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):  # extra state (e.g. a module's _extra_state dict)
            continue
        target = own.get(key)
        if isinstance(target, torch.Tensor) and target.is_floating_point() and not value.is_floating_point():
            raise WeightsError(
                f"{where}: tensor {key} is {value.dtype} where the model has {target.dtype}; "
                "integer weights are not cast, nothing was loaded"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise WeightsError(
                f"{where}: tensor {key} is not finite ({bad} of {value.numel()} values NaN or inf); nothing was loaded"
            )
