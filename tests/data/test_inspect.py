"""`hvpmtl data inspect` on a manifest with a known label distribution, a missing, a corrupt and a
truncated image file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hvpmtl.cli import main
from hvpmtl.data import DataConfig, ManifestImages, SyntheticScenes
from hvpmtl.data.inspect import inspect_dataset, markdown, scan_dataset, summarize
from hvpmtl.viz.dataset import plot_dataset_report

pytest.importorskip("matplotlib")

# manifest line -> (file, tags, (width, height) or None for no image written)
LINES = {
    2: ("a.png", "cat|dog", (32, 24)),
    3: ("b.png", "cat", (40, 40)),
    4: ("c.png", "dog|grass", (16, 48)),
    5: ("d.png", "cat|dog|grass", (32, 24)),
    6: ("e.png", "", (64, 32)),
    7: ("missing.png", "cat", None),
    8: ("bad.png", "bird", None),  # text, not an image
    9: ("trunc.png", "grass", (32, 32)),  # a valid header, pixels cut off
}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for name, _, size in LINES.values():
        if size is not None:
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / name)
    (tmp_path / "img" / "bad.png").write_text("not an image")
    trunc = tmp_path / "img" / "trunc.png"
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    rows = ["path,labels"] + [f"img/{name},{tags}" for name, tags, _ in LINES.values()]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _scan(manifest: Path, **kwargs):
    ds = ManifestImages(manifest, check_files=False)
    return scan_dataset(ds, progress=False, **kwargs)


def test_counts_labels_and_cooccurrence_are_exact(manifest):
    s = summarize(_scan(manifest), top=10)
    assert s["counts"] == {
        "images": 8, "scanned": 8, "sampled": False, "classes": 4, "readable": 6,
        "missing": 1, "corrupt": 1, "too_large": 0, "untagged": 1,
    }  # fmt: skip
    assert s["label_frequency"] == [
        {"class": "cat", "images": 4}, {"class": "dog", "images": 3},
        {"class": "grass", "images": 3}, {"class": "bird", "images": 1},
    ]  # fmt: skip
    assert s["labels_per_image"]["histogram"] == {"0": 1, "1": 4, "2": 2, "3": 1}
    assert s["labels_per_image"]["mean"] == pytest.approx(11 / 8)
    pairs = [(p["a"], p["b"], p["images"]) for p in s["cooccurrence"]]
    assert pairs == [("cat", "dog", 2), ("dog", "grass", 2), ("cat", "grass", 1)]
    assert s["cooccurrence"][0]["p_b_given_a"] == pytest.approx(2 / 4)
    assert s["cooccurrence"][0]["p_a_given_b"] == pytest.approx(2 / 3, abs=1e-4)
    tail = s["long_tail"]
    assert (tail["label_occurrences"], tail["classes_unseen"], tail["imbalance"]) == (11, 0, 4.0)


def test_missing_and_corrupt_files_are_named_by_manifest_line(manifest):
    problems = {p["kind"]: p for p in _scan(manifest).problems}
    assert set(problems) == {"missing", "corrupt"}
    assert problems["missing"]["where"] == f"{manifest}:7"
    assert problems["missing"]["path"].endswith("missing.png")
    assert problems["corrupt"]["where"] == f"{manifest}:8"
    assert "not an image" in problems["corrupt"]["reason"]


def test_verify_decodes_and_finds_the_truncated_file(manifest):
    header = _scan(manifest)
    assert header.sizes[32, 32] == 1  # the truncated file's header reads fine
    full = _scan(manifest, verify=True)
    corrupt = sorted(p["where"] for p in full.problems if p["kind"] == "corrupt")
    assert corrupt == [f"{manifest}:8", f"{manifest}:9"]
    assert full.sizes == {(32, 24): 2, (40, 40): 1, (16, 48): 1, (64, 32): 1}


def test_image_sizes_come_from_the_headers(manifest):
    sizes = summarize(_scan(manifest), img_size=33)["image_sizes"]
    assert (sizes["width"]["min"], sizes["width"]["max"]) == (16, 64)
    assert (sizes["height"]["min"], sizes["height"]["max"]) == (24, 48)
    assert sizes["most_common"][0] == {"size": "32x24", "images": 2}
    assert sizes["short_side_below_img_size"] == 5  # all but 40x40
    # short sides 24, 24, 40, 16, 32, 32 (the truncated file's header): three are at least twice 16
    assert summarize(_scan(manifest), img_size=33, decode_side=16)["image_sizes"]["short_side_twice_decode_side"] == 3
    assert "`data.reduced_decode=true` decodes them" in markdown(summarize(_scan(manifest), decode_side=16), "t", False)
    assert "reduced_decode" not in markdown(summarize(_scan(manifest), decode_side=21), "t", False)  # none >= 42


def test_limit_scans_a_seeded_sample(manifest):
    a, b = _scan(manifest, limit=3), _scan(manifest, limit=3)
    assert a.scanned == 3 and a.num_images == 8 and sum(a.tags_per_image.values()) == 3
    assert a.class_counts.tolist() == b.class_counts.tolist() and a.sizes == b.sizes
    assert summarize(a)["counts"]["sampled"] is True


def test_generated_sets_are_read_item_by_item():
    ds = SyntheticScenes(5, img_size=32)
    scan = scan_dataset(ds, progress=False)
    assert scan.sizes == {(32, 32): 5}
    labels = torch.stack([ds[i]["labels"] for i in range(5)])
    assert scan.class_counts.tolist() == labels.sum(0).long().tolist()


def test_report_files(manifest, tmp_path):
    cfg = DataConfig(dataset="manifest", manifest=str(manifest))
    out = tmp_path / "report"
    summary = inspect_dataset(cfg, 32, out=out, top=5, progress=False, plot=plot_dataset_report)
    saved = json.loads((out / "report.json").read_text())
    assert saved["counts"] == summary["counts"] and len(saved["problems"]) == 2
    md = (out / "report.md").read_text()
    assert f"{manifest}:7" in md and f"{manifest}:8" in md and "| cat | dog | 2 |" in md
    for name in ("label_frequency.png", "labels_per_image.png", "image_sizes.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == (800, 450)


def test_plots_come_from_the_caller(manifest, tmp_path):
    out = tmp_path / "report"
    inspect_dataset(DataConfig(dataset="manifest", manifest=str(manifest)), 32, out=out, top=5, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # no plot function: no plots
    assert "(plots skipped: no plot function given)" in (out / "report.md").read_text()
    drawn = []
    cfg = DataConfig(dataset="manifest", manifest=str(manifest))
    inspect_dataset(cfg, 32, out=out, top=5, progress=False, plot=lambda s, sizes, folder: drawn.append((s, folder)))
    assert [(s["counts"]["images"], f) for s, f in drawn] == [(8, out)]
    assert "![image sizes](image_sizes.png)" in (out / "report.md").read_text()


def test_cli(manifest, tmp_path, capsys):
    args = ["data", "inspect", "--out", str(tmp_path / "r"), "--workers", "0", "--quiet",
            "data.dataset=manifest", f"data.manifest={manifest}"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 images, 4 classes" in out and f"missing: {manifest}:7" in out
    assert main([*args[:2], "--strict", *args[2:]]) == 1
    assert main([*args[:2], "--limit", "-1", *args[2:]]) == 2
    assert "--limit=-1" in capsys.readouterr().err


def test_report_md_escapes_names_in_table_cells(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    tags = ["<script>alert(1)</script>", "x\ny", "a|b", "R&D", "# heading"]
    m = tmp_path / "w.jsonl"
    m.write_text(json.dumps({"path": "a.png", "labels": tags}) + "\n")
    out = tmp_path / "report"
    inspect_dataset(DataConfig(dataset="manifest", manifest=str(m)), 32, out=out, top=5, progress=False)
    md = (out / "report.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "R&amp;D" in md and "a\\|b" in md and "x<br>y" in md
    for line in md.splitlines():  # every table row is whole: no cell broke it
        assert not line.startswith("|") or line.endswith("|"), line
    assert not any(line.startswith("y") for line in md.splitlines())


def test_cli_counts_untagged_images_and_says_what_mlc_does_with_them(manifest, tmp_path, capsys):
    args = ["data", "inspect", "--out", str(tmp_path / "r"), "--workers", "0", "--quiet",
            "data.dataset=manifest", f"data.manifest={manifest}"]  # fmt: skip
    assert main(args) == 0
    assert "1 without a tag (data.untagged=unknown: MLC leaves them out)" in capsys.readouterr().out
    assert main([*args, "data.untagged=negative"]) == 0
    assert "1 without a tag (data.untagged=negative: MLC trains them as all-negative)" in capsys.readouterr().out
