"""SimMIM mask generator: exact counts at the mask-unit granularity."""

import math

import pytest
import torch

from hvpmtl.data.masking import MaskGenerator, upsample_mask


@pytest.mark.parametrize("img,unit,ratio", [(224, 32, 0.6), (64, 16, 0.6), (64, 32, 0.6), (192, 32, 0.75)])
def test_exact_ratio_per_image(img, unit, ratio):
    gen = MaskGenerator(img, unit, ratio)
    mask = gen(16, generator=torch.Generator().manual_seed(0))
    g = img // unit
    assert mask.shape == (16, g, g) and mask.dtype == torch.bool
    assert (mask.flatten(1).sum(1) == math.ceil(ratio * g * g)).all()


def test_masks_differ_across_images_and_are_seeded():
    gen = MaskGenerator(224, 32, 0.6)
    a = gen(8, generator=torch.Generator().manual_seed(1))
    b = gen(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1


def test_upsample_keeps_ratio():
    mask = MaskGenerator(224, 32, 0.6)(4)  # 7 x 7 units
    up = upsample_mask(mask, (56, 56))  # Swin's 4x4-pixel patch grid
    assert up.float().mean().item() == pytest.approx(mask.float().mean().item())
    assert torch.equal(up[:, ::8, ::8], mask)


def test_bad_sizes_name_the_key():
    with pytest.raises(ValueError, match="mask_patch_size"):
        MaskGenerator(64, 24)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskGenerator(64, 16, 1.0)
