"""Image files to uint8 RGB tensors: every mode PIL opens, EXIF orientation, a pixel limit.

How each PIL mode becomes 8-bit RGB (after ``ImageOps.exif_transpose`` turns phone photos
upright):

* ``RGB``: as is. ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's own
  conversion (CMYK without a colour profile).
* Alpha modes (``RGBA``, ``RGBa``, ``LA``, ``PA``, a palette with a transparent entry): the
  alpha channel is dropped and the stored colour kept, as torchvision's and timm's loaders do.
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I``, PIL's 32-bit integer mode
  that 16-bit files may open as): value / 257, rounded (0 -> 0, 32768 -> 128, 65535 -> 255). An
  ``I`` image with values outside 0..65535 is refused.
* 32-bit float grey (``F``): by its value range: within [0, 1] -> times 255; within [0, 255] ->
  as is; otherwise stretched linearly from [min, max] to [0, 255] (a constant image -> 0).
  NaN or infinite values are refused.
* Any other mode is refused by name.

Anything that stops a decode (unreadable, truncated, empty, not an image, over the pixel limit,
a refused mode) raises :class:`BadImageError` naming the file.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

from hvpmtl.data.config import DEFAULT_MAX_IMAGE_PIXELS

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_PIL_LIMIT_LOCK = threading.Lock()


class BadImageError(ValueError):
    """An image file cannot be used: unreadable, truncated, too large or of a refused mode.

    Raised in a DataLoader worker, PyTorch re-raises it in the main process as
    ``BadImageError("Caught BadImageError in DataLoader worker ...<traceback>")``; the
    constructor recovers the original one-line message from that text.
    """

    def __init__(self, message: str = "", reason: str = ""):
        super().__init__(_original_message(message, type(self).__name__))
        self.reason = reason or str(self)  # what is wrong, without the file's name


def _bad(path: Path, reason: str) -> BadImageError:
    return BadImageError(f"{path}: {reason}", reason)


def _original_message(message: str, name: str) -> str:
    """The message of a worker's exception, from the text a DataLoader re-raises it with."""
    if not message.startswith(f"Caught {name} ") or "Traceback" not in message:
        return message
    marker = f"{name}: "
    last = message.rstrip().rsplit("\n", 1)[-1]
    return last.split(marker, 1)[1] if marker in last else last


@contextmanager
def _pil_pixel_limit_held() -> Iterator[None]:
    """Hold PIL's global decompression-bomb limit for one decode; restore it afterwards.

    PIL reads ``Image.MAX_IMAGE_PIXELS`` while opening and while loading frames or tiles; the
    lock keeps concurrent decodes in this process from seeing each other's value.
    """
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # read_image's own check decides
        saved = Image.MAX_IMAGE_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _grey16_to_8bit(image: Image.Image, path: Path) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise _bad(
            path,
            f"32-bit integer pixels (mode {image.mode}) in [{values.min()}, {values.max()}], "
            "outside the 16-bit range 0..65535: not supported",
        )
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")


def _float_to_8bit(image: Image.Image, path: Path) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise _bad(path, "float pixels (mode F) include NaN or infinite values")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        values = values * 255.0
    elif not (lo >= 0.0 and hi <= 255.0):
        values = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, path: str | Path = "image") -> Image.Image:
    """``image`` as 8-bit RGB by the rules of the module docstring; ``path`` names it in errors."""
    path, mode = Path(path), image.mode
    if mode == "I" or mode.startswith("I;16"):
        image = _grey16_to_8bit(image, path)
    elif mode == "F":
        image = _float_to_8bit(image, path)
    elif mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise _bad(path, f"image mode {mode} is not supported ({err})") from None


def read_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data: bytes | None = None, min_side: int = 0
) -> torch.Tensor:
    """An image file as uint8 RGB ``3 x H x W``, upright by its EXIF orientation.

    Modes are converted as the module docstring says. An image of more than ``max_pixels``
    pixels (0: no limit) is refused before it is decoded. Raises :class:`BadImageError`
    naming the file for anything that stops the decode. ``data``: the file's bytes (a shard
    member, say); ``path`` then only names it in errors.

    ``min_side`` > 0: a JPEG at least twice as large on both sides is decoded at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling, PIL's ``draft``), the smallest scale that keeps both sides
    at least ``min_side``: 1.4 to 3 times faster decodes of 1 to 12 megapixel photos
    (docs/performance.md). The pixel limit applies to the full size. Other formats decode at
    full size.
    """
    path = Path(path)
    try:
        with _pil_pixel_limit_held():
            Image.MAX_IMAGE_PIXELS = None  # opening reads the header only; its size is checked here
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                width, height = image.size
                if max_pixels and width * height > max_pixels:
                    raise _bad(path, _too_large(width, height, max_pixels))
                Image.MAX_IMAGE_PIXELS = max_pixels or None  # for frames and tiles read while loading
                if min_side > 0 and image.format == "JPEG":
                    image.draft(image.mode, (min_side, min_side))  # both sides stay >= min_side
                rgb = to_rgb(ImageOps.exif_transpose(image), path)
    except BadImageError:
        raise
    except Image.UnidentifiedImageError:
        empty = not data if data is not None else path.is_file() and path.stat().st_size == 0
        raise _bad(path, "empty file (0 bytes)" if empty else "not an image file PIL can identify") from None
    except Image.DecompressionBombError as err:  # a frame or tile over the limit
        raise _bad(path, f"{err} (data.max_image_pixels={max_pixels})") from None
    except DECODE_ERRORS as err:
        raise _bad(path, str(err) or type(err).__name__) from None
    return pil_to_tensor(rgb)


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (
        f"{width}x{height} = {width * height} pixels, over data.max_image_pixels={max_pixels} "
        "(a guard against decompression bombs; raise it, or 0 for no limit)"
    )
