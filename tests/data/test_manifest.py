"""Manifests (CSV, JSONL), ImageFolder, and their errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

import hvpmtl
from hvpmtl.data import (
    BadImageError,
    DataConfig,
    ImageFolderImages,
    ImageLoading,
    ManifestImages,
    build_dataset,
    build_pretrain_dataset,
    read_image,
)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def _png(path: Path, value: int, size: tuple[int, int] = (20, 30)) -> torch.Tensor:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = torch.full((3, *size), value, dtype=torch.uint8)
    img[0, 0, 0] = 255 - value
    write_png(img, str(path))
    return img


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for i in range(4):
        _png(root / f"sub/{i}.png", 10 * i)
    return root


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("path,labels\n" + "\n".join(rows) + "\n")
    return path


def test_csv_round_trip(images: Path, tmp_path: Path):
    m = _csv(tmp_path / "m.csv", ["sub/0.png,dog|grass", "sub/1.png,cat", "", "sub/2.png,", "sub/3.png,grass | cat"])
    ds = ManifestImages(m, images)
    assert ds.classes == ["cat", "dog", "grass"] and len(ds) == 4
    s = ds[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 20, 30)
    assert torch.equal(s["image"], _png(images / "sub/0.png", 0))
    assert s["labels"].tolist() == [0, 1, 1]
    assert ds[2]["labels"].tolist() == [0, 0, 0]
    assert ds[3]["labels"].tolist() == [1, 0, 1]
    with pytest.raises(IndexError):
        ds[4]


def test_jsonl_round_trip_with_given_vocabulary(images: Path, tmp_path: Path):
    m = tmp_path / "m.jsonl"
    rows = [{"path": "sub/1.png", "labels": ["b"]}, {"path": str(images / "sub/2.png"), "labels": ["a", "b"]}]
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = ManifestImages(m, images, classes=["z", "b", "a"])
    assert ds.classes == ["z", "b", "a"]
    assert ds[0]["labels"].tolist() == [0, 1, 0]
    assert ds[1]["labels"].tolist() == [0, 1, 1]
    names = tmp_path / "names.txt"
    names.write_text("# vocabulary\nb\na\n")
    assert ManifestImages(m, images, classes=names).classes == ["b", "a"]


def test_read_image_converts_grey_to_rgb(tmp_path: Path):
    grey = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    write_png(grey, str(tmp_path / "g.png"))
    assert torch.equal(read_image(tmp_path / "g.png"), grey.expand(3, 3, 4))


def test_default_root_is_the_manifest_folder(images: Path):
    m = _csv(images / "m.csv", ["sub/0.png,x"])
    assert len(ManifestImages(m)) == 1


def test_missing_image_names_file_and_line(images: Path, tmp_path: Path):
    m = _csv(tmp_path / "m.csv", ["sub/0.png,a", "sub/nope.png,a", "sub/gone.png,b"])
    with pytest.raises(FileNotFoundError, match=r"m\.csv:3: image not found: .*nope\.png \(1 more missing\)"):
        ManifestImages(m, images)
    assert len(ManifestImages(m, images, check_files=False)) == 3


def test_unknown_label_names_file_and_line(images: Path, tmp_path: Path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "sub/0.png", "labels": ["a"]}\n{"path": "sub/1.png", "labels": ["zebra"]}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: unknown label 'zebra'"):
        ManifestImages(m, images, classes=["a", "b"])


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("m.csv", "path,labels\nsub/0.png,a\nsub/1.png,a,extra\n", "m.csv:3: malformed"),
        ("m.csv", "file,tags\nsub/0.png,a\n", "m.csv:1: the header"),
        (
            "m.jsonl",
            '{"path": "sub/0.png", "labels": ["a"]}\n{"path": "sub/1.png", "labels": \n',
            "m.jsonl:2: malformed",
        ),
        ("m.jsonl", '\n{"path": "sub/0.png", "labels": "a"}\n', "m.jsonl:2: malformed"),
    ],
)
def test_malformed_lines_name_file_and_line(images: Path, tmp_path: Path, name: str, text: str, where: str):
    m = tmp_path / name
    m.write_text(text)
    with pytest.raises(ValueError) as info:
        ManifestImages(m, images)
    assert where in str(info.value)


def test_corrupt_image_error_and_skip(images: Path, tmp_path: Path):
    (images / "sub/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    m = _csv(tmp_path / "m.csv", ["sub/0.png,a", "sub/bad.png,b", "sub/2.png,c"])
    with pytest.raises(BadImageError, match=r"m\.csv:3: cannot read image .*bad\.png"):
        ManifestImages(m, images)[1]
    ds = ManifestImages(m, images, loading=ImageLoading(on_bad_image="skip"))
    with pytest.warns(UserWarning, match=r"m\.csv:3: skipping unreadable image .*bad\.png"):
        s = ds[1]
    assert s["index"] == 2 and s["labels"].tolist() == [0, 0, 1]  # the next sample
    ds[1]
    assert ds.num_skipped == 2 and ds.skipped_files == {str(images / "sub/bad.png")}


def test_image_folder_is_one_hot(tmp_path: Path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _png(tmp_path / "train" / cls / f"{i}.png", 40 * i)
    ds = ImageFolderImages(tmp_path / "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    assert ds[0]["labels"].tolist() == [1, 0] and ds[4]["labels"].tolist() == [0, 1]
    assert ds[0]["image"].shape == (3, 20, 30)
    built = build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), 32, "train")
    assert built.classes == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="data.root: no 'val' folder"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), 32, "val")


def test_build_manifest_from_config(images: Path, tmp_path: Path):
    m = _csv(tmp_path / "m.csv", ["sub/0.png,a", "sub/1.png,b"])
    cfg = DataConfig(dataset="manifest", root=str(images), manifest=str(m))
    assert build_dataset(cfg, 32).classes == ["a", "b"]
    with pytest.raises(ValueError, match="data.val_manifest: not set"):
        build_dataset(cfg, 32, "val")
    with pytest.raises(FileNotFoundError, match="data.manifest: file not found"):
        build_dataset(DataConfig(dataset="manifest", manifest=str(tmp_path / "x.csv")), 32)
    with pytest.raises(ValueError, match="data.num_classes=3"):
        build_dataset(DataConfig(dataset="manifest", root=str(images), manifest=str(m), num_classes=3), 32)


def test_byte_order_mark_is_accepted(images: Path, tmp_path: Path):
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfpath,labels\r\nsub/0.png,a\r\nsub/1.png,b\r\n")
    assert ManifestImages(tmp_path / "excel.csv", images).classes == ["a", "b"]
    (tmp_path / "m.jsonl").write_bytes(b'\xef\xbb\xbf{"path": "sub/0.png", "labels": ["a"]}\n')
    assert len(ManifestImages(tmp_path / "m.jsonl", images)) == 1


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_non_utf8_bytes_name_file_and_line(images: Path, tmp_path: Path, name: str):
    rows = ["path,labels", "sub/0.png,a", "sub/caf\xe9.png,b"] if name == "m.csv" else [
        '{"path": "sub/0.png", "labels": ["a"]}', '{"path": "sub/caf\xe9.png", "labels": ["b"]}'
    ]  # fmt: skip
    (tmp_path / name).write_bytes("\n".join(rows).encode("latin-1"))
    line = len(rows)
    with pytest.raises(ValueError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        ManifestImages(tmp_path / name, images)
    cfg = hvpmtl.load_config(None, ["data.dataset=manifest", f"data.manifest={tmp_path / name}", f"data.root={images}"])
    with pytest.raises(ValueError, match=rf"{name}:{line}: not UTF-8"):
        build_pretrain_dataset(cfg)


def test_manifest_without_tags_says_so(images: Path, tmp_path: Path):
    m = _csv(tmp_path / "m.csv", ["sub/0.png,", "sub/1.png,"])
    base = ["data.dataset=manifest", f"data.manifest={m}", f"data.root={images}"]
    with pytest.raises(ValueError, match=r"m\.csv: no tags: the 'labels' column is empty on all 2 lines, and tasks"):
        build_pretrain_dataset(hvpmtl.load_config(None, base))
    untagged = hvpmtl.load_config(None, [*base, "tasks.mlc.weight=0", "tasks.distill.weight=0"])
    assert len(build_pretrain_dataset(untagged)) == 2  # SwAV and SimMIM need no tags


def test_jsonl_drops_blank_tags_as_csv_does(images: Path, tmp_path: Path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": "sub/0.png", "labels": ["dog", " ", "", "\t"]}) + "\n")
    ds = ManifestImages(m, images)
    assert ds.classes == ["dog"] and ds[0]["labels"].tolist() == [1]


def test_deeply_nested_jsonl_line_is_one_line_error(images: Path, tmp_path: Path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "sub/0.png", "labels": ["a"]}\n{"path": "sub/1.png", "labels": ' + "[" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: malformed line: not valid JSON \(nested too deeply\)") as info:
        ManifestImages(m, images)
    assert "\n" not in str(info.value)
