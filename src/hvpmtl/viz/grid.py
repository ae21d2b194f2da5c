"""Picture building blocks: un-normalise, enlarge, tile with captions, colour a heat-map, save.

Pictures are ``3 x H x W`` tensors (float in [0, 1] while built, uint8 when done) made with
torchvision and PIL only, so the training loop can draw them without matplotlib. Layouts have
exact sizes: a grid of ``rows x cols`` tiles of side ``T`` with ``PAD`` pixels between and around
them, a caption band of ``CAPTION_H`` pixels above each tile and, optionally, a ``CAPTION_W``
pixels wide column of row names on the left.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PAD = 2  # pixels between and around tiles
CAPTION_H = 14  # caption band above each tile
CAPTION_W = 96  # row-name column on the left
INK, GOOD, BAD = (0, 0, 0), (0, 120, 0), (190, 0, 0)
# Anchors of matplotlib's "inferno" map (black -> purple -> red -> orange -> pale yellow).
INFERNO = torch.tensor(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]], dtype=torch.float32,
) / 255  # fmt: skip


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images ``B x 3 x H x W`` back to [0, 1] (``x * std + mean``, clamped)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def auto_scale(img_size: int, target: int = 128) -> int:
    """The integer enlargement that brings ``img_size`` pixels closest to ``target`` (at least 1)."""
    return max(1, round(target / img_size))


def enlarge(x: torch.Tensor, scale: int, mode: str = "nearest") -> torch.Tensor:
    """``B x C x H x W`` -> ``B x C x sH x sW`` (nearest keeps pixels and patches sharp)."""
    if scale == 1:
        return x
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, scale_factor=scale, mode=mode, **kwargs)


def heat_colors(heat: torch.Tensor) -> torch.Tensor:
    """Heat values ``... x H x W`` in [0, 1] -> colours ``... x 3 x H x W`` (inferno, 256 levels)."""
    lut = _lut256().to(heat.device)
    return lut[(heat.clamp(0, 1) * 255).round().long()].movedim(-1, -3)


@functools.cache
def _lut256() -> torch.Tensor:
    """:data:`INFERNO` interpolated linearly to 256 colours, ``256 x 3``."""
    pos = torch.linspace(0, len(INFERNO) - 1, 256)
    lo = pos.floor().long().clamp(max=len(INFERNO) - 2)
    frac = (pos - lo).unsqueeze(-1)
    return INFERNO[lo] * (1 - frac) + INFERNO[lo + 1] * frac


def overlay(images: torch.Tensor, heat: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Blend ``images`` (``B x 3 x H x W`` in [0, 1]) with the colours of ``heat`` (``B x H x W``,
    each map scaled to its own maximum): ``(1 - alpha) image + alpha colour``."""
    peak = heat.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    return (1 - alpha) * images + alpha * heat_colors(heat / peak)


def grid_size(rows: int, cols: int, tile: int, captions: bool = False, row_names: bool = False) -> tuple[int, int]:
    """``(height, width)`` in pixels of :func:`tile_grid`'s picture."""
    band = CAPTION_H if captions else 0
    height = rows * (tile + band + PAD) + PAD
    width = cols * (tile + PAD) + PAD + (CAPTION_W if row_names else 0)
    return height, width


def tile_grid(
    tiles: torch.Tensor,
    captions: Sequence[Sequence[tuple[str, tuple[int, int, int]]]] | None = None,
    row_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Tiles ``rows x cols x 3 x T x T`` (float, [0, 1]) -> one uint8 picture ``3 x H x W`` on white,
    of :func:`grid_size`. ``captions[r][c]`` is ``(text, rgb)`` written above tile ``(r, c)``;
    ``row_names[r]`` is written left of row ``r``."""
    from PIL import Image, ImageDraw, ImageFont

    rows, cols, _, t, _ = tiles.shape
    band = CAPTION_H if captions is not None else 0
    left = CAPTION_W if row_names is not None else 0
    height, width = grid_size(rows, cols, t, captions is not None, row_names is not None)
    canvas = torch.ones(3, height, width)
    for r in range(rows):
        for c in range(cols):
            y, x = PAD + r * (t + band + PAD) + band, left + PAD + c * (t + PAD)
            canvas[:, y : y + t, x : x + t] = tiles[r, c].float().cpu()
    picture = to_uint8(canvas)
    if captions is None and row_names is None:
        return picture
    image = Image.fromarray(picture.permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for r in range(rows):
        top = PAD + r * (t + band + PAD)
        if row_names is not None:
            draw.text((4, top + band + t // 2), _fit(draw, row_names[r], CAPTION_W - 6, font), fill=INK, font=font,
                      anchor="lm")  # fmt: skip
        for c in range(cols if captions is not None else 0):
            text, rgb = captions[r][c]
            x = left + PAD + c * (t + PAD)
            draw.text((x + 1, top + band // 2), _fit(draw, text, t - 2, font), fill=rgb, font=font, anchor="lm")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _fit(draw, text: str, width: int, font) -> str:
    """``text`` cut (with an ellipsis) to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8 [0, 255] (rounded)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(picture: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 ``3 x H x W`` picture as a PNG, atomically (a crash leaves no half file)."""
    import io

    from PIL import Image

    from hvpmtl.engine.checkpoint import atomic_write

    if picture.dtype != torch.uint8 or picture.dim() != 3 or picture.shape[0] != 3:
        raise ValueError(f"expected a uint8 3 x H x W picture, got {picture.dtype} {tuple(picture.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(picture.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    path = Path(path)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path

