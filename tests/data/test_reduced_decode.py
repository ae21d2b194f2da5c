"""Reduced JPEG decoding (``data.reduced_decode``): scale chosen by the views' needs, EXIF and the
pixel limit kept, every crop the views draw at least the view size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import hvpmtl
from hvpmtl.data import BadImageError, build_pretrain_dataset, read_image, reduced_decode_side
from hvpmtl.data.shard_writer import write_shards


def _jpeg(path: Path, width: int, height: int, orientation: int = 0) -> Path:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif)
    return path


@pytest.mark.parametrize("size, min_side, decoded", [
    ((1024, 768), 316, (512, 384)),  # 1/2: 1/4 would leave 192 < 316
    ((2048, 1536), 316, (512, 384)),  # 1/4
    ((1024, 768), 400, (1024, 768)),  # 384 < 400 at 1/2: full size
    ((500, 375), 316, (500, 375)),  # not twice the need: full size
    ((1024, 768), 0, (1024, 768)),  # off
])  # fmt: skip
def test_jpeg_decodes_at_the_smallest_scale_that_keeps_min_side(tmp_path, size, min_side, decoded):
    image = read_image(_jpeg(tmp_path / "a.jpg", *size), min_side=min_side)
    assert tuple(image.shape) == (3, decoded[1], decoded[0]) and image.dtype == torch.uint8
    if decoded != size:  # the same picture: close to the full decode shrunk to that size
        full = v2.functional.resize(read_image(tmp_path / "a.jpg"), [decoded[1], decoded[0]], antialias=True)
        assert (image.float() - full.float()).abs().mean() < 3.0


def test_other_formats_exif_and_the_pixel_limit(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((768, 1024, 3), np.uint8)).save(png)
    assert read_image(png, min_side=316).shape == (3, 768, 1024)  # only JPEGs have DCT scaling
    turned = _jpeg(tmp_path / "phone.jpg", 1024, 768, orientation=6)  # shown rotated by 90 degrees
    assert read_image(turned, min_side=316).shape == (3, 512, 384)
    with pytest.raises(BadImageError, match="1024x768 = 786432 pixels, over data.max_image_pixels=500000"):
        read_image(turned, max_pixels=500_000, min_side=316)  # the limit is on the full size


def test_side_keeps_every_crop_the_views_draw_at_the_view_size():
    assert reduced_decode_side(hvpmtl.load_config("paper-vit-b")) == 0  # off by default: decoded as stored
    cfg = hvpmtl.load_config("paper-vit-b", ["data.reduced_decode=true"])
    side = reduced_decode_side(cfg)
    assert side == math.ceil(224 / math.sqrt(0.67 * 0.75)) == 316
    # the worst case: the shorter side at exactly `side`, crops of the smallest scale at the extreme ratios
    crop = v2.RandomResizedCrop(224, scale=cfg.data.crop_scale, ratio=cfg.data.crop_ratio)
    torch.manual_seed(0)
    for shape in ((side, side), (side, 2 * side), (3 * side, side)):
        image = torch.zeros(3, *shape)
        sides = [min(params["height"], params["width"]) for params in (crop.make_params([image]) for _ in range(500))]
        assert min(sides) >= 224 - 1, (shape, min(sides))  # - 1: torchvision rounds each side


def test_pretraining_reads_large_jpegs_reduced(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        _jpeg(tmp_path / "img" / f"{i}.jpg", 1024, 768)
    (tmp_path / "train.csv").write_text("path,labels\nimg/0.jpg,a\nimg/1.jpg,b\n")
    common = ["data.dataset=manifest", f"data.manifest={tmp_path / 'train.csv'}", f"data.root={tmp_path}",
              "backbone.img_size=224", "train.output_dir="]  # fmt: skip
    views = build_pretrain_dataset(hvpmtl.load_config(None, [*common, "data.reduced_decode=true"]))
    assert views.base.decode_min_side == 316 and views.base.load_image(0).shape == (3, 384, 512)
    assert views[(0, 0)]["views"][0].shape == (3, 224, 224)
    off = build_pretrain_dataset(hvpmtl.load_config(None, common))
    assert off.base.decode_min_side == 0 and off.base.load_image(0).shape == (3, 768, 1024)
    index = write_shards(views.base, tmp_path / "shards", samples_per_shard=2)  # streamed shards too
    sharded = [*common[3:], "data.dataset=shards", f"data.shards={index.origin}", "data.batch_size=2",
               "data.shard_streams=1"]  # fmt: skip  (no manifest keys: shards do not read them)
    stream = build_pretrain_dataset(hvpmtl.load_config(None, [*sharded, "data.reduced_decode=true"]))
    assert stream.decode_min_side == 316
    assert build_pretrain_dataset(hvpmtl.load_config(None, sharded)).decode_min_side == 0
