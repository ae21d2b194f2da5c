"""``data.io_threads``: a worker's batch reads its files concurrently, then makes the same samples."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import hvpmtl
from hvpmtl.data import BadImageError, ImageLoading, ManifestImages, build_pretrain_dataset, collate_pretrain
from hvpmtl.engine.sampler import GlobalBatchSampler


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["path,labels"]
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        lines.append(f"img/{i}.jpg,{'ab'[i % 2]}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.csv"


def _views(manifest: Path, *overrides: str):
    data = ["data.dataset=manifest", f"data.manifest={manifest}", f"data.root={manifest.parent}"]
    cfg = hvpmtl.load_config(None, [*data, "backbone.img_size=32", "tasks.mim.mask_patch_size=16", "train.output_dir=",
                                    *overrides])  # fmt: skip
    return build_pretrain_dataset(cfg)


def _batches(views) -> list[dict]:
    sampler = GlobalBatchSampler(len(views), 4, 0, 1, 1, seed=0)
    sampler.set_epoch(1, 0)
    return list(DataLoader(views, batch_sampler=sampler, num_workers=0, collate_fn=collate_pretrain))


def test_threaded_reads_give_the_same_batches(manifest):
    plain, threaded = _views(manifest), _views(manifest, "data.io_threads=4")
    assert threaded.base.io_threads == 4
    for a, b in zip(_batches(plain), _batches(threaded), strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["mask"], b["mask"])
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))
    assert not threaded.base._prefetched  # every prefetched file was used


def test_files_are_read_concurrently(manifest):
    base = ManifestImages(manifest, root=manifest.parent, loading=ImageLoading(io_threads=4))
    active, peak, lock = [0], [0], threading.Lock()
    read = base.file_bytes

    def slow_read(i: int) -> bytes:  # a file system with latency
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return read(i)

    base.file_bytes = slow_read
    base.prefetch(list(range(8)))
    assert peak[0] == 4 and sorted(base._prefetched) == list(range(8))
    assert torch.equal(base.load_image(3), ManifestImages(manifest, root=manifest.parent).load_image(3))


def test_unreadable_files_are_named_as_without_threads(manifest):
    loaders = [_views(manifest, f"data.io_threads={threads}") for threads in (0, 4)]
    (manifest.parent / "img" / "5.jpg").write_bytes(b"not a jpeg")
    (manifest.parent / "img" / "6.jpg").unlink()  # gone after the start (network storage)
    for views in loaders:
        with pytest.raises(BadImageError, match=r"train.csv:7: cannot read image .*5.jpg: not an image file"):
            views.__getitems__([(4, 0), (5, 0)])
        with pytest.raises(BadImageError, match=r"train.csv:8: cannot read image .*6.jpg: .*No such file"):
            views.__getitems__([(6, 0), (7, 0)])
