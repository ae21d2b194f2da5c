"""SimMIM patch masking, made on the data side (in the collate function), not in the model.

The mask is returned at *mask-unit* granularity (one entry per ``mask_patch_size`` square of
pixels, 32x32 by default, Sec. 3.2 of the paper); the backbone adapter upsamples it to its own
patch grid. As in SimMIM's generator the count is exact: ``ceil(ratio * units)`` units per image.
"""

from __future__ import annotations

import math

import torch


class MaskGenerator:
    """Random patch masks with an exact masked count per image.

    Args:
        img_size: input side in pixels (square images).
        mask_patch_size: side of one mask unit in pixels; must divide ``img_size``.
        mask_ratio: fraction of units masked; ``ceil(ratio * units)`` units exactly.
    """

    def __init__(self, img_size: int, mask_patch_size: int = 32, mask_ratio: float = 0.6):
        if img_size % mask_patch_size:
            raise ValueError(
                f"tasks.mim.mask_patch_size={mask_patch_size} must divide the image size {img_size}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"tasks.mim.mask_ratio={mask_ratio} must be in [0, 1)")
        self.grid = img_size // mask_patch_size
        self.num_units = self.grid * self.grid
        self.num_masked = math.ceil(mask_ratio * self.num_units)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masks ``B x g x g`` (bool, True = masked), each with exactly ``num_masked`` units."""
        scores = torch.rand(batch_size, self.num_units, generator=generator)
        idx = scores.argsort(dim=1)[:, : self.num_masked]
        mask = torch.zeros(batch_size, self.num_units, dtype=torch.bool)
        mask.scatter_(1, idx, True)
        return mask.view(batch_size, self.grid, self.grid)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Repeat a ``B x h x w`` mask to ``B x H x W`` where ``H, W`` are integer multiples."""
    h, w = mask.shape[-2:]
    H, W = size
    if H % h or W % w:
        raise ValueError(f"mask grid {h}x{w} does not divide the target grid {H}x{W}")
    return mask.repeat_interleave(H // h, dim=-2).repeat_interleave(W // w, dim=-1)
