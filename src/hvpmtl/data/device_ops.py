"""Batched uint8 image ops with one parameter per image, on any device (the device half of the views).

Each op takes a uint8 batch ``B x 3 x H x W`` and per-image parameters (tensors of length ``B``,
on the batch's device) and returns uint8. It computes what torchvision's v2 kernel computes on
each image alone with that image's parameter: the same float32 arithmetic, the same truncation
or rounding back to uint8 after every op, the same affine grid and fill. Results agree with the
per-image kernels up to float rounding (a pixel may differ by one level where a value lands on
an integer; tests/data/test_device_views.py states the tolerance per op).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
RAND_AUGMENT_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip  (the ops of torchvision's RandAugment table that rand_augment_op applies)


@cache
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A constant tensor, made once per device: a tensor built from Python values on a CUDA device
    is a copy from pageable host memory, which waits for the device each time. Read-only."""
    return torch.tensor(values, device=device)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """``B`` float64 values -> float32 ``B x 1 x 1 x 1`` (a Python float in the per-image kernel)."""
    return values.to(torch.float32).view(-1, 1, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0, 255).to(torch.uint8)  # truncation, as the kernels' ``.to(uint8)``


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Floored luma ``B x 1 x H x W`` (float32) of a uint8 batch."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(GREY[0]).add_(g, alpha=GREY[1]).add_(b, alpha=GREY[2]).unsqueeze_(-3).floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``x * ratio + other * (1 - ratio)``, clamped and truncated to uint8 (torchvision's ``_blend``)."""
    # addcmul rounds like the kernel's add_(other, alpha=1 - ratio): once, not twice
    return _to_uint8(torch.addcmul(x.mul(_per_image(ratio)), other, _per_image(1.0 - ratio)))


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_brightness`` with one factor per image."""
    return _to_uint8(x.mul(_per_image(factor)))


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_contrast``: blend with the image's mean grey level."""
    return _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_saturation``: blend with the image's grey version."""
    return _blend(x, _grey(x), factor)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    # torchvision's algorithm (after Pillow's), step for step, so that the rounding agrees
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / divisor).unbind(dim=-3)
    maxc_neq_r, maxc_eq_g = maxc != r, maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub_(gc).mul_(~maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(maxc_neq_r.logical_and_(maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    h, s, v = image.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = _constant(((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2)), image.device)
    return vpqt.gather(-3, select[:, i].moveaxis(0, -3))


def hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_hue``: shift the hue by ``factor`` (in turns, ``[-0.5, 0.5]``) in HSV."""
    hsv = _rgb_to_hsv(x.to(torch.float32).mul_(1.0 / 255))
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(factor.to(torch.float32).view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3)).mul_(255 + 1.0 - 1e-3).to(torch.uint8)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_sharpness``: blend the inner pixels with a 3x3 smoothing (1s around a 5, over 13)."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = _constant(((a, a, a), (a, b, a), (a, a, a)), x.device).expand(x.shape[-3], 1, 3, 3)
    out = x.to(torch.float32)
    blurred = nnf.conv2d(out, kernel, groups=x.shape[-3]).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_(blurred.sub_(inner).mul_(_per_image(1.0 - factor)))
    return _to_uint8(out)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``posterize``: keep the top ``bits`` (0-8, integer) bits of each value."""
    bits = bits.to(torch.int32).clamp(0, 8)
    keep = ((1 << bits) - 1) << (8 - bits)
    return x & keep.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``solarize``: invert the values ``>= threshold`` (on the 0-255 scale)."""
    return torch.where(x >= _per_image(threshold), 255 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """``autocontrast`` (torchvision's kernel is per image already)."""
    return F.autocontrast(x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """``equalize`` (torchvision's kernel is per image already)."""
    return F.equalize(x)


def inverse_affine(
    height: int,
    width: int,
    angle: torch.Tensor | float = 0.0,
    translate: tuple[torch.Tensor | float, torch.Tensor | float] = (0.0, 0.0),
    shear: tuple[torch.Tensor | float, torch.Tensor | float] = (0.0, 0.0),
    corner_centre: bool = False,
) -> torch.Tensor:
    """``B x 2 x 3`` float64 inverse affine matrices, as torchvision's ``affine`` builds them (scale 1).

    Angles and shears in degrees, translations in pixels; the centre is the image's, or its
    top-left corner with ``corner_centre`` (RandAugment's shears). Give at least one tensor.
    """
    first = next(v for v in (angle, *translate, *shear) if isinstance(v, torch.Tensor))

    def as64(v: torch.Tensor | float) -> torch.Tensor:  # a fill, not a host-to-device copy, for a float
        if isinstance(v, torch.Tensor):
            return v.to(torch.float64).expand(first.shape)
        return torch.full(first.shape, v, dtype=torch.float64, device=first.device)

    angle, (tx, ty), (sx, sy) = as64(angle), map(as64, translate), map(as64, shear)
    cx, cy = (-width * 0.5, -height * 0.5) if corner_centre else (0.0, 0.0)
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(sx), torch.deg2rad(sy)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=-1).view(-1, 2, 3)


def warp(x: torch.Tensor, matrix: torch.Tensor, mode: str = "nearest", fill_zero: bool = False) -> torch.Tensor:
    """Resample each image by its inverse affine ``matrix`` (``B x 2 x 3``), torchvision's grid.

    ``fill_zero`` is torchvision's ``fill=0`` (RandomRotation's default): a ones channel is
    warped along and multiplies the result; ``fill=None`` (RandAugment) is plain zero padding.
    """
    B, C, H, W = x.shape
    dev = x.device
    base = torch.empty(1, H, W, 3, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, steps=W, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, steps=H, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    theta = matrix.to(torch.float32).transpose(1, 2).div_(_constant((0.5 * W, 0.5 * H), dev))
    grid = base.view(1, H * W, 3).expand(B, -1, -1).bmm(theta).view(B, H, W, 2)
    image = x.to(torch.float32)
    if fill_zero:
        image = torch.cat((image, torch.ones(B, 1, H, W, device=dev)), dim=1)
    image = nnf.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if fill_zero:
        image, mask = torch.tensor_split(image, indices=(-1,), dim=-3)
        image = image * mask if mode == "bilinear" else torch.where(mask < 0.5, 0.0, image)
    return image.round_().to(torch.uint8)


def rotate(x: torch.Tensor, angle: torch.Tensor, mode: str = "nearest", fill_zero: bool = False) -> torch.Tensor:
    """``rotate`` by ``angle`` degrees (counter-clockwise) about the centre, same size."""
    matrix = inverse_affine(x.shape[-2], x.shape[-1], angle=-torch.remainder(angle.to(torch.float64), 360.0))
    return warp(x, matrix, mode, fill_zero)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """``horizontal_flip``."""
    return x.flip(-1)


def _shear_degrees(magnitude: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.atan(magnitude.to(torch.float64)))


def rand_augment_op(name: str, x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's RandAugment op ``name`` (``RandAugment._apply_image_or_video_transform``) with
    one signed magnitude per image, as that method receives it (nearest interpolation, no fill)."""
    H, W = x.shape[-2:]
    zero = torch.zeros_like(magnitude, dtype=torch.float64)
    if name == "Identity":
        return x
    if name in ("ShearX", "ShearY"):
        deg = _shear_degrees(magnitude)
        shear = (deg, zero) if name == "ShearX" else (zero, deg)
        return warp(x, inverse_affine(H, W, shear=shear, corner_centre=True))
    if name in ("TranslateX", "TranslateY"):
        pixels = magnitude.to(torch.float64).trunc()  # torchvision: int(magnitude)
        shift = (pixels, zero) if name == "TranslateX" else (zero, pixels)
        return warp(x, inverse_affine(H, W, translate=shift))
    if name == "Rotate":
        return rotate(x, magnitude)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        op = {"Brightness": brightness, "Color": saturation, "Contrast": contrast, "Sharpness": sharpness}[name]
        return op(x, 1.0 + magnitude.to(torch.float64))
    if name == "Posterize":
        return posterize(x, magnitude.trunc())
    if name == "Solarize":
        return solarize(x, 255.0 * magnitude.to(torch.float64))
    if name == "AutoContrast":
        return autocontrast(x)
    if name == "Equalize":
        return equalize(x)
    raise ValueError(f"RandAugment op '{name}' has no batched version")
