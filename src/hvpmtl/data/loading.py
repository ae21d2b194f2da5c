"""How image files are loaded: one :class:`ImageLoading` value for every file-backed reader, and the
``on_bad_image`` policy they share (:class:`BadImages`).

``ImageLoading`` is built once from the ``data`` config (:meth:`ImageLoading.from_config`) and
handed to the manifest, image-folder, format and shard readers and to the shard stream at
construction. ``BadImages`` is what each of them does with an image that cannot be decoded:
``error`` raises a :class:`BadImageError` naming the file (and where it is listed); ``skip``
tries the next candidate, warns once per file and process, counts the skip and appends the file to
the run's skipped-image list (:mod:`hvpmtl.data.skipped`) when a run folder is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hvpmtl.data.config import BAD_IMAGE_POLICIES, DEFAULT_MAX_IMAGE_PIXELS
from hvpmtl.data.decode import BadImageError
from hvpmtl.data.skipped import record_skipped_image

__all__ = ["DEFAULT_LOADING", "BadImages", "ImageLoading"]

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True)
class ImageLoading:
    """How a reader loads its image files.

    Args:
        on_bad_image: ``error`` | ``skip`` (``data.on_bad_image``).
        max_pixels: larger images are bad images, 0 = no limit (``data.max_image_pixels``).
        decode_min_side: > 0: large JPEGs decode reduced, keeping this many pixels a side
            (``data.reduced_decode``, pre-training only; :func:`hvpmtl.data.views.reduced_decode_side`).
        io_threads: > 1: a batch's files are read on this many threads first (``data.io_threads``).
        skip_log_dir: the run folder whose skipped-image list ``skip`` appends to; None: not listed.
    """

    on_bad_image: str = "error"
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    decode_min_side: int = 0
    io_threads: int = 0
    skip_log_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image='{self.on_bad_image}' must be 'error' or 'skip'")
        if self.max_pixels < 0 or self.decode_min_side < 0 or self.io_threads < 0:
            raise ValueError(f"{self}: max_pixels, decode_min_side and io_threads must be >= 0")

    @classmethod
    def from_config(cls, data: Any, decode_min_side: int = 0, skip_log_dir: str | Path | None = None) -> ImageLoading:
        """The loading a ``DataConfig`` asks for; ``decode_min_side`` and ``skip_log_dir`` come from the
        caller (pre-training sets them: they depend on the views and the run folder)."""
        return cls(data.on_bad_image, data.max_image_pixels, decode_min_side, data.io_threads,
                   Path(skip_log_dir) if skip_log_dir else None)  # fmt: skip


DEFAULT_LOADING = ImageLoading()  # a reader built without one: errors on bad images, PIL's pixel limit


class LoadingSettings:
    """Read-only views of a reader's :class:`ImageLoading` (``self.loading``), under their old names."""

    loading: ImageLoading

    @property
    def on_bad_image(self) -> str:
        return self.loading.on_bad_image

    @property
    def max_pixels(self) -> int:
        return self.loading.max_pixels

    @property
    def decode_min_side(self) -> int:
        return self.loading.decode_min_side

    @property
    def io_threads(self) -> int:
        return self.loading.io_threads

    @property
    def skip_log_dir(self) -> Path | None:
        return self.loading.skip_log_dir


class BadImages:
    """The ``on_bad_image`` policy of one reader in one process: ``num_skipped`` counts the images
    replaced, ``skipped_files`` the files warned about (once each)."""

    def __init__(self, loading: ImageLoading):
        self.loading = loading
        self.num_skipped = 0
        self.skipped_files: set[str] = set()

    def first_readable(
        self,
        candidates: Iterable[K],
        name: Callable[[K], tuple[str, str]],
        load: Callable[[K], T],
        exhausted: Callable[[K, BadImageError], BadImageError],
    ) -> tuple[K, T]:
        """``(candidate, load(candidate))`` for the first candidate that loads.

        ``name(c)`` gives ``(where it is listed + ": " or "", file)`` and is called before ``load``,
        outside the policy: an error it raises (a malformed listing) stops the reader under either
        policy. A :class:`BadImageError` from ``load`` raises naming the file (``error``) or moves on
        to the next candidate (``skip``); when none is left, ``exhausted(first failed candidate,
        its error)`` is raised.
        """
        first: tuple[K, BadImageError] | None = None
        for c in candidates:
            listed, file = name(c)
            try:
                return c, load(c)
            except BadImageError as err:
                if self.loading.on_bad_image == "error":
                    why = f"{listed}cannot read image {file}: {err.reason} "
                    why += "(data.on_bad_image=skip skips unreadable images)"
                    raise BadImageError(why, err.reason) from None
                first = first or (c, err)
                self.skip(listed, file, err)
        if first is None:
            raise ValueError("first_readable: no candidate to load")
        raise exhausted(*first)

    def skip(self, listed: str, file: str, err: BadImageError) -> None:
        """Count a replaced image; warn about its file and list it in the run folder, once per process."""
        self.num_skipped += 1
        if file in self.skipped_files:
            return
        self.skipped_files.add(file)
        warnings.warn(f"{listed}skipping unreadable image {file}: {err.reason}", stacklevel=4)
        if self.loading.skip_log_dir is not None:
            record_skipped_image(self.loading.skip_log_dir, file, err.reason)
