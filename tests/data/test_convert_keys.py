"""``hvpmtl data convert`` takes ``key=value`` like every other command (its ``--flags`` stay as
aliases), and a bad key or value stops it with one line before it reads anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from format_fixtures import coco_layout, voc_layout

from conftest import assert_one_line_error
from hvpmtl.cli import main


def _convert(capsys, *args: str) -> tuple[int, str]:
    rc = main(["data", "convert", *args])
    return rc, capsys.readouterr().err


def test_key_value_forms_write_the_same_manifest_as_the_flags(tmp_path: Path, capsys):
    ann = coco_layout(tmp_path)
    flags, keys, dotted = (tmp_path / f"{n}.jsonl" for n in ("flags", "keys", "dotted"))
    assert _convert(capsys, "--format", "coco", "--annotations", str(ann), "--out", str(flags))[0] == 0
    assert _convert(capsys, "format=coco", f"annotations={ann}", f"out={keys}", "missing_images=error")[0] == 0
    rc, err = _convert(capsys, "data.dataset=coco", f"data.annotations={ann}", "--out", str(dotted),
                       "data.check_files=true")  # fmt: skip
    assert rc == 0, err
    assert flags.read_text() == keys.read_text() == dotted.read_text()
    assert keys.with_name("keys.classes.txt").read_text() == flags.with_name("flags.classes.txt").read_text()


def test_voc_options_as_keys(tmp_path: Path, capsys):
    ann = voc_layout(tmp_path)
    out = tmp_path / "voc.jsonl"
    rc, err = _convert(capsys, "format=voc", f"annotations={ann}", f"out={out}", "voc_difficult=include")
    assert rc == 0, err
    assert out.is_file()


@pytest.mark.parametrize(
    "fmt, args, expected",
    [
        ("coco", ["annotation=x.json"], "unknown key 'annotation'"),
        ("imagefolder", [], "format=imagefolder: choose from coco, voc"),
        ("tencent", ["min_confidence=high"], "min_confidence='high'"),
        ("tencent", ["min_confidence=1.5"], "min_confidence=1.5: must be in [0, 1]"),
        ("openimages", ["--min-confidence", "nan"], "min_confidence=nan"),
        ("coco", ["--voc-difficult", "include"], "voc_difficult has no effect with format=coco"),
        ("coco", ["--min-confidence", "0.3"], "min_confidence has no effect with format=coco"),
        ("coco", ["--dictionary", "d.csv"], "dictionary has no effect with format=coco"),
        ("coco", ["missing_images=keep"], "missing_images='keep'"),
        ("coco", ["check_files=maybe"], "check_files='maybe'"),
        ("coco", ["--format", "voc"], "format given twice"),
        ("coco", ["nonsense"], "not of the form key=value"),
    ],
)
def test_bad_keys_and_values_stop_with_one_line(tmp_path: Path, capsys, fmt, args, expected):
    ann = coco_layout(tmp_path)
    rc, err = _convert(capsys, f"format={fmt}", f"annotations={ann}", f"out={tmp_path / 'm.jsonl'}", *args)
    assert_one_line_error(rc, err)
    assert expected in err, err
    assert not (tmp_path / "m.jsonl").exists()


def test_missing_and_misnamed_outputs_stop_before_reading(tmp_path: Path, capsys):
    rc, err = _convert(capsys, "format=coco", f"out={tmp_path / 'm.jsonl'}")
    assert_one_line_error(rc, err)
    assert "annotations is required" in err
    rc, err = _convert(capsys, "format=coco", f"annotations={tmp_path / 'absent.json'}", f"out={tmp_path / 'm.txt'}")
    assert_one_line_error(rc, err)
    assert "m.txt" in err and ".jsonl" in err  # the output's name is checked before the annotations are read
