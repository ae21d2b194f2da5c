"""SimMIM reconstructions as a picture (``hvpmtl visualize recon``).

Four rows, one column per image: the input, the input with its masked units greyed out (what
the encoder does not see; it gets mask tokens there), the decoder's output everywhere, and that
output pasted into the masked units of the input (the loss of Eq. (4) reads only those).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hvpmtl.data.masking import upsample_mask
from hvpmtl.viz.grid import denormalize, enlarge, tile_grid

ROWS = ("input", "masked input", "reconstruction", "pasted")
MASK_GREY = 0.5


def paste(images: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``recon`` in the masked units of ``mask`` (``B x h x w``, True = masked), ``images`` elsewhere;
    ``images, recon: B x 3 x H x W``."""
    keep = upsample_mask(mask.to(images.device), images.shape[-2:]).unsqueeze(1)
    return torch.where(keep, recon, images)


@torch.no_grad()
def reconstruction_rows(
    model, images: torch.Tensor, mask: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The four rows of :data:`ROWS` in [0, 1], ``4 x B x 3 x H x W``, for normalised ``images``.

    ``model`` is an :class:`hvpmtl.HVPMTL` with MIM on; ``mask: B x g x g`` at mask-unit granularity.
    """
    recon = model.reconstruct(images, mask).float()
    x, y = denormalize(images.float(), mean, std), denormalize(recon, mean, std)
    masked = paste(x, torch.full_like(x, MASK_GREY), mask)
    return torch.stack([x, masked, y, paste(x, y, mask)])


def recon_grid(
    model, images: torch.Tensor, mask: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: int = 1
) -> torch.Tensor:
    """uint8 picture ``3 x H x W`` of :func:`reconstruction_rows`, each image enlarged ``scale`` times:
    ``H = 4 (S scale + PAD) + PAD``, ``W = CAPTION_W + B (S scale + PAD) + PAD`` (``grid.grid_size``)."""
    rows = reconstruction_rows(model, images, mask, mean, std)
    n, b = rows.shape[:2]
    tiles = enlarge(rows.flatten(0, 1), scale).unflatten(0, (n, b))
    return tile_grid(tiles, row_names=ROWS)
