"""Image decoding (modes, EXIF, pixel limit) and bad images: errors that name the file, skips that are listed."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._utils import ExceptionWrapper

import hvpmtl
from hvpmtl.cli import main
from hvpmtl.config import ConfigError
from hvpmtl.data import BadImageError, DataConfig, ImageFiles, ImageLoading, ManifestImages, build_dataset, read_image
from hvpmtl.data.skipped import SKIPPED_LIST, SKIPPED_PARTS, record_skipped_image, skipped_images_summary
from hvpmtl.engine import run_dir as run_io
from tiny import TINY_MODEL

TINY_RUN = [
    *TINY_MODEL,
    "backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "data.dataset=manifest",
    "data.batch_size=2",
    "data.num_workers=1",
    "data.rand_augment=false",
    "train.max_steps=2",
    "train.progress=false",
    "eval.knn_every=0",
]


def _grey(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _rgb(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# decoding: every mode to 8-bit RGB


@pytest.mark.parametrize(
    ("name", "array", "expected"),
    [
        ("g16.png", np.full((4, 4), 32768, np.uint16), 128),  # I;16 PNG, mid-grey
        ("g16max.png", np.full((4, 4), 65535, np.uint16), 255),
        ("g16b.tif", np.full((4, 4), 32768, ">u2"), 128),  # I;16B
        ("i32.tif", np.full((4, 4), 32768, np.int32), 128),  # I
        ("f01.tif", np.full((4, 4), 0.5, np.float32), 128),  # F in [0, 1]: x 255
        ("f255.tif", np.full((4, 4), 100.0, np.float32), 100),  # F in [0, 255]: as is
    ],
)
def test_wide_grey_modes_scale_to_8bit(tmp_path: Path, name: str, array: np.ndarray, expected: int):
    image = read_image(_grey(tmp_path / name, array))
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 4)
    assert abs(int(image[0, 0, 0]) - expected) <= 1 and torch.equal(image[0], image[2])


def test_float_outside_0_255_is_stretched(tmp_path: Path):
    values = np.array([[-1.0, 0.0], [1.0, 3.0]], np.float32)
    image = read_image(_grey(tmp_path / "f.tif", values))
    assert image[0].tolist() == [[0, 64], [128, 255]]


@pytest.mark.parametrize(
    ("array", "why"),
    [(np.full((2, 2), np.nan, np.float32), "NaN"), (np.full((2, 2), 70000, np.int32), "outside the 16-bit range")],
)
def test_unusable_wide_values_are_refused_by_name(tmp_path: Path, array: np.ndarray, why: str):
    path = _grey(tmp_path / "odd.tif", array)
    with pytest.raises(BadImageError, match=rf"odd\.tif: .*{why}"):
        read_image(path)


def test_alpha_palette_cmyk_and_1bit_become_rgb(tmp_path: Path):
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (2, 2), (77, 128)).save(tmp_path / "la.png")
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    Image.new("1", (2, 2), 1).save(tmp_path / "bit.png")
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    expected = {"rgba.png": (10, 20, 30), "la.png": (77, 77, 77), "cmyk.tif": (255, 0, 0),
                "bit.png": (255, 255, 255), "pal.png": (200, 100, 50)}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "Palette images with Transparency" warning
        for name, rgb in expected.items():
            assert read_image(tmp_path / name)[:, 1, 1].tolist() == list(rgb), name


def test_exif_orientation_is_applied(tmp_path: Path):
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    image = read_image(tmp_path / "phone.png")
    assert image.shape == (3, 30, 20)  # upright: taller than wide
    assert (image[0] == 255).nonzero().tolist() == [[0, 19]]  # the top-left corner went top-right


# ---------------------------------------------------------------------------------------------
# decompression bombs: a pixel limit, a bad image like any other


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit ``side x side`` PNG of zeros: 400 M pixels in about 50 KB."""
    rows = zlib.compress(bytes((side // 8 + 1) * side), 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_bad_image(tmp_path: Path):
    _bomb_png(tmp_path / "bomb.png")
    _rgb(tmp_path / "ok.png")
    (tmp_path / "m.csv").write_text("path,labels\nbomb.png,a\nok.png,b\n")
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImageError, match=r"m\.csv:2: cannot read image .*bomb\.png: 20000x20000 .*max_image_pixels"):
        ManifestImages(tmp_path / "m.csv")[0]
    skipping = ManifestImages(tmp_path / "m.csv", loading=ImageLoading(on_bad_image="skip"))
    with pytest.warns(UserWarning, match=r"m\.csv:2: skipping unreadable image .*bomb\.png"):
        assert skipping[0]["index"] == 1
    assert limit == Image.MAX_IMAGE_PIXELS  # PIL's global limit is left as it was


def test_pixel_limit_is_configurable(tmp_path: Path, monkeypatch):
    path = _rgb(tmp_path / "a.png", size=(40, 40))
    with pytest.raises(BadImageError, match=r"a\.png: 40x40 = 1600 pixels, over data\.max_image_pixels=1000"):
        read_image(path, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 1600 pixels
    assert read_image(path, max_pixels=0).shape == (3, 40, 40)  # 0: no limit
    assert Image.MAX_IMAGE_PIXELS == 100
    (tmp_path / "m.csv").write_text("path,labels\na.png,x\n")
    cfg = DataConfig(dataset="manifest", manifest=str(tmp_path / "m.csv"), max_image_pixels=1000)
    assert build_dataset(cfg, 32).max_pixels == 1000
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels=-1"):
        hvpmtl.load_config(None, ["data.max_image_pixels=-1"])


# ---------------------------------------------------------------------------------------------
# truncated, empty and non-image files


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        _rgb(root / f"{i}.png", 40 * i, (40, 40))
    (root / "trunc.png").write_bytes((root / "1.png").read_bytes()[:60])
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    return root


@pytest.mark.parametrize(("name", "why"), [("trunc.png", "truncated|broken|EOF"), ("zero.png", "empty file"),
                                           ("text.png", "not an image file")])  # fmt: skip
def test_bad_file_error_names_file_and_line(bad_files: Path, name: str, why: str):
    (bad_files / "m.csv").write_text(f"path,labels\n0.png,a\n{name},b\n")
    with pytest.raises(BadImageError, match=rf"m\.csv:3: cannot read image .*{name}: .*({why})"):
        ManifestImages(bad_files / "m.csv")[1]


def test_worker_error_comes_back_as_its_one_line_message():
    try:
        raise BadImageError("m.csv:3: cannot read image a.png: image file is truncated")
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BadImageError) as info:
        wrapped.reraise()
    assert str(info.value) == "m.csv:3: cannot read image a.png: image file is truncated"


def test_many_bad_images_in_a_row_stop_a_skipping_data_set(bad_files: Path):
    paths = [str(bad_files / n) for n in ("trunc.png", "zero.png", "text.png", "0.png")]
    skip = ImageLoading(on_bad_image="skip")
    ds = ImageFiles(paths, [[0]] * 4, ["a"], skip, origin="manifest m.csv", max_bad_in_a_row=3)
    with pytest.warns(UserWarning), pytest.raises(BadImageError, match=r"manifest m\.csv: 3 images in a row"):
        ds[0]
    assert ds[1]["index"] == 3  # two bad, then a readable one


def _pretrain(capsys, manifest: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    args = ["pretrain", *TINY_RUN, f"data.manifest={manifest}", f"train.output_dir={out}", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_bad_image_is_one_line_exit_2(bad_files: Path, tmp_path: Path, capsys):
    (bad_files / "m.csv").write_text("path,labels\n0.png,a\ntrunc.png,b\n1.png,a\n2.png,b\n")
    rc, _, err = _pretrain(capsys, bad_files / "m.csv", tmp_path / "run")  # read by a DataLoader worker
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("error: ") and "m.csv:3: cannot read image" in err and "trunc.png" in err


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_step_leaves_nothing_half_made(bad_files: Path, tmp_path: Path, capsys):
    """A data error in the first batch: the outputs the run had begun are removed, so the same
    command (once the data is mended) starts afresh instead of being refused as a previous run."""
    (bad_files / "m.csv").write_text("path,labels\n0.png,a\ntrunc.png,b\n1.png,a\n2.png,b\n")
    run = tmp_path / "run"
    rc, _, err = _pretrain(capsys, bad_files / "m.csv", run, "data.batch_size=4")  # the first batch holds it
    assert rc == 2 and "trunc.png" in err
    assert run_io.previous_outputs(run) == []
    rc, _, err = _pretrain(capsys, bad_files / "m.csv", run, "data.batch_size=4")  # the first batch holds it
    assert rc == 2 and "previous run" not in err and "trunc.png" in err


def test_cli_every_image_bad_is_one_line_naming_the_manifest(bad_files: Path, tmp_path: Path, capsys):
    (bad_files / "m.csv").write_text("path,labels\ntrunc.png,a\nzero.png,b\ntext.png,a\n")
    rc, _, err = _pretrain(capsys, bad_files / "m.csv", tmp_path / "run", "data.on_bad_image=skip")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"manifest {bad_files / 'm.csv'}: none of the 3 images can be read" in err


def test_cli_skipped_images_are_counted_and_listed(bad_files: Path, tmp_path: Path, capsys):
    lines = ["0.png,a", "trunc.png,b", "1.png,a", "zero.png,b", "2.png,a", "trunc.png,a", "3.png,b"]
    (bad_files / "m.csv").write_text("path,labels\n" + "\n".join(lines) + "\n")
    run = tmp_path / "run"
    skip_all_in_one_step = ("data.on_bad_image=skip", "data.batch_size=7", "train.max_steps=1")
    rc, out, _ = _pretrain(capsys, bad_files / "m.csv", run, *skip_all_in_one_step)
    assert rc == 0
    listed = (run / SKIPPED_LIST).read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == [str(bad_files / "trunc.png"), str(bad_files / "zero.png")]
    assert f"skipped images: 2 (list: {run / SKIPPED_LIST})" in out.splitlines()
    assert not (run / SKIPPED_PARTS).exists()


def test_skipped_list_merges_processes_and_run_segments(tmp_path: Path):
    assert skipped_images_summary(tmp_path) is None and not (tmp_path / SKIPPED_LIST).exists()
    record_skipped_image(tmp_path, "/d/a.png", "image file is truncated")
    (tmp_path / SKIPPED_PARTS / "other-1.tsv").write_text("/d/b.png\tempty file (0 bytes)\n/d/a.png\tx\n")
    assert skipped_images_summary(tmp_path) == f"skipped images: 2 (list: {tmp_path / SKIPPED_LIST})"
    record_skipped_image(tmp_path, "/d/c.png", "not an image\tfile\n")  # a resumed run's segment
    assert skipped_images_summary(tmp_path).startswith("skipped images: 3 ")
    listed = (tmp_path / SKIPPED_LIST).read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == ["/d/a.png", "/d/b.png", "/d/c.png"]
    assert listed[-1] == "/d/c.png\tnot an image file"  # one line per file, earlier segments first
