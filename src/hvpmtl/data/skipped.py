"""The images a run skipped (``data.on_bad_image=skip``), listed in its run folder.

Every process that reads images (the main process, each DataLoader worker, each torchrun rank)
appends ``path<TAB>reason`` lines to its own file under ``<run>/skipped_images.parts/``, so no
two processes write to one file. At the end of the run :func:`skipped_images_summary` merges
them into ``<run>/skipped_images.txt`` (one line per file, first reason kept, earlier segments
of a resumed run included) and returns the line the run prints. Ranks on other machines count
only where the run folder is on a shared file system.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

SKIPPED_LIST = "skipped_images.txt"
SKIPPED_PARTS = "skipped_images.parts"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def record_skipped_image(run_dir: str | Path, path: str, reason: str) -> None:
    """Append ``path<TAB>reason`` to this process's part of the run's skipped-image list."""
    folder = Path(run_dir) / SKIPPED_PARTS
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{socket.gethostname()}-{os.getpid()}.tsv"
    with open(part, "a", encoding="utf-8") as f:
        f.write(f"{path}\t{_one_line(reason)}\n")


def _read_list(file: Path, into: dict[str, str]) -> None:
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        path, _, reason = line.partition("\t")
        if path:
            into.setdefault(path, reason)


def merge_skipped_images(run_dir: str | Path) -> dict[str, str]:
    """Merge the parts into ``<run>/skipped_images.txt`` and delete them; ``{path: reason}``."""
    run_dir = Path(run_dir)
    listed, parts = run_dir / SKIPPED_LIST, run_dir / SKIPPED_PARTS
    skipped: dict[str, str] = {}
    if listed.is_file():
        _read_list(listed, skipped)
    part_files = sorted(parts.glob("*.tsv")) if parts.is_dir() else []
    for part in part_files:
        _read_list(part, skipped)
    if part_files:
        tmp = listed.with_name(listed.name + ".tmp")
        tmp.write_text("".join(f"{p}\t{r}\n" for p, r in skipped.items()), encoding="utf-8")
        tmp.replace(listed)
    if parts.is_dir():
        shutil.rmtree(parts, ignore_errors=True)
    return skipped


def skipped_images_summary(run_dir: str | Path) -> str | None:
    """``skipped images: N (list: <run>/skipped_images.txt)`` after merging, or None if none."""
    skipped = merge_skipped_images(run_dir)
    if not skipped:
        return None
    return f"skipped images: {len(skipped)} (list: {Path(run_dir) / SKIPPED_LIST})"
