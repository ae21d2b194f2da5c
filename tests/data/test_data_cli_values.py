"""The flags of ``hvpmtl data export`` and ``data shard``: a bad value is one line, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_one_line_error
from hvpmtl.cli import main


@pytest.mark.parametrize("size", ["0", "-5", "3"])
def test_export_refuses_an_image_side_too_small(tmp_path: Path, capsys, size):
    rc = main(["data", "export", "--format", "coco", "--out", str(tmp_path / "x"), "--img-size", size,
               "data.train_size=8", "data.val_size=4"])  # fmt: skip
    assert_one_line_error(rc, capsys.readouterr().err, "--img-size")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("quality", ["0", "101", "500"])
def test_shard_refuses_a_jpeg_quality_outside_1_to_100(tmp_path: Path, capsys, quality):
    rc = main(["data", "shard", "--out", str(tmp_path / "s"), "--image-format", "jpg", "--quality", quality,
               "data.train_size=8"])  # fmt: skip
    assert_one_line_error(rc, capsys.readouterr().err, "--quality")
    assert not (tmp_path / "s").exists()
