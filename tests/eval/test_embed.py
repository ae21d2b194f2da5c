"""``hvpmtl embed`` / ``hvpmtl.embed``: features per image of a folder, a manifest or a source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import hvpmtl
from hvpmtl.data import EvalTransform
from hvpmtl.data.decode import read_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import assert_one_line_error, run_cli  # noqa: E402
from engine.conftest import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five images of different sizes and formats, one in a sub-folder, plus a manifest of three."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    names = ["a.jpg", "b.png", "sub/c.jpg", "d.jpeg", "e.png"]
    for k, name in enumerate(names):
        pixels = (rng.random((40 + 8 * k, 56, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / name)
    (root / "notes.txt").write_text("not an image")
    (root / "list.csv").write_text("path,labels\nsub/c.jpg,x\na.jpg,\nb.png,y|x\n")
    return root


def by_hand(run: Path, image: Path, part: str = "student") -> torch.Tensor:
    """The mean of the feature map of one image, through the run's evaluation transform."""
    from hvpmtl.runs import Run, build_masked_backbone

    weights = Run(run).weights(part)
    data = weights.pretrain["data"]
    transform = EvalTransform(weights.backbone.img_size, data["eval_crop_pct"], data["mean"], data["std"])
    backbone = build_masked_backbone(weights).eval()
    with torch.no_grad():
        fmap, _ = backbone(transform(read_image(str(image)))[None], None)
    return fmap.float().mean(dim=(2, 3))[0]


def test_a_folder_gives_every_image_in_order_with_the_run_s_features(tiny_run, photos):
    emb = hvpmtl.embed(tiny_run, photos)
    assert emb.paths == ["a.jpg", "b.png", "d.jpeg", "e.png", "sub/c.jpg"]  # sorted, recursive, images only
    assert emb.features.shape == (5, 32) and emb.features.dtype == torch.float32
    for k in (0, 4):
        torch.testing.assert_close(emb.features[k], by_hand(tiny_run, photos / emb.paths[k]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb.features[0], emb.features[1])


def test_a_manifest_keeps_its_order_and_paths(tiny_run, photos):
    emb = hvpmtl.embed(tiny_run, photos / "list.csv")
    assert emb.paths == ["sub/c.jpg", "a.jpg", "b.png"]
    folder = hvpmtl.embed(tiny_run, photos)
    for k, name in enumerate(emb.paths):
        torch.testing.assert_close(emb.features[k], folder.features[folder.paths.index(name)])


def test_teacher_and_student_differ_where_their_weights_do(tiny_run, photos):
    student = hvpmtl.embed(tiny_run, photos, part="student")
    teacher = hvpmtl.embed(tiny_run, photos, part="teacher")
    assert teacher.meta["part"] == "teacher" and student.meta["part"] == "student"
    assert not torch.allclose(student.features, teacher.features)
    by_teacher = by_hand(tiny_run, photos / "a.jpg", "teacher")
    torch.testing.assert_close(teacher.features[0], by_teacher, atol=1e-5, rtol=1e-5)


def test_the_cli_writes_safetensors_and_npy(tiny_run, photos, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    status, err = run_cli(capsys, "embed", str(tiny_run), str(photos), "--out", str(out), "--no-progress")
    assert status == 0, err
    expected = hvpmtl.embed(tiny_run, photos)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        torch.testing.assert_close(f.get_tensor("features"), expected.features)
    assert json.loads(meta["paths"]) == expected.paths and meta["feature"] == "mean" and meta["img_size"] == "32"
    npy = tmp_path / "f.npy"
    status, err = run_cli(capsys, "embed", str(tiny_run), str(photos / "list.csv"), "--out", str(npy), "--no-progress")
    assert status == 0, err
    assert np.load(npy).shape == (3, 32)
    assert (tmp_path / "f.npy.paths.txt").read_text().splitlines() == ["sub/c.jpg", "a.jpg", "b.png"]


def test_a_data_source_by_keys(tiny_run, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    status, err = run_cli(capsys, "embed", str(tiny_run), "data.val_size=12", "--out", str(out), "--no-progress")
    assert status == 0, err
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("features").shape == (12, 32)
        assert json.loads(f.metadata()["paths"])[:2] == ["synthetic:val:000000", "synthetic:val:000001"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["{photos}/missing"], "no such file or folder"),
        (["{photos}/notes.txt"], "not a folder or a .csv/.jsonl manifest"),
        (["{empty}"], "no image files"),
        (["{photos}", "--out", "{tmp}/f.csv"], "unknown format '.csv'"),
        (["{photos}", "--out", "{existing}"], "exists; pass --overwrite"),
        (["{photos}", "data.val_size=3"], "data.val_size: has no effect with DATA"),
        (["{photos}", "data.root=x"], "data.root: has no effect on a folder"),
        (["{photos}", "--feature", "pixels"], "feature: expected one of"),
        ([], "give DATA"),
    ],
)
def test_bad_input_is_one_line(tiny_run, photos, tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing.npy").write_bytes(b"x")
    fill = {"photos": photos, "empty": tmp_path / "empty", "tmp": tmp_path, "existing": tmp_path / "existing.npy"}
    args = [a.format(**fill) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "f.safetensors")]
    status, err = run_cli(capsys, "embed", str(tiny_run), *args)
    assert_one_line_error(status, err, expected)
    assert (tmp_path / "existing.npy").read_bytes() == b"x"


@pytest.mark.slow
def test_two_processes_give_the_file_of_one(tiny_run, photos, tmp_path):
    outs = []
    for n in (1, 2):
        out = tmp_path / f"{n}.safetensors"
        r = torchrun(n, ["embed", str(tiny_run), str(photos), "--out", str(out), "--no-progress"])
        assert r.returncode == 0, r.stderr[-2000:]
        with safe_open(str(out), "pt") as f:
            outs.append((f.get_tensor("features"), json.loads(f.metadata()["paths"])))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]
