"""Shards from hostile or foreign hands: index names that leave the folder, tar files of another
tool, link members, JSON nested too deeply (the shard tests proper are in test_shards.py)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from test_shards import _args, _source

from hvpmtl.data.decode import BadImageError
from hvpmtl.data.shard_stream import ShardStream
from hvpmtl.data.shard_writer import write_shards
from hvpmtl.data.shards import ShardIndex, load_shard_index, parse_labels

pytest.importorskip("webdataset")


@pytest.mark.parametrize("name", ["../victim/important.txt", "ABSOLUTE", "..", "sub/train-000000.tar"])
def test_index_names_outside_the_folder_are_refused_and_never_deleted(tmp_path, name):
    out, keep = tmp_path / "sh", tmp_path / "victim" / "important.txt"
    write_shards(_source(8), out, samples_per_shard=4, shuffle_seed=None)
    keep.parent.mkdir()
    keep.write_text("precious")
    name = str(keep) if name == "ABSOLUTE" else name
    meta = json.loads((out / "shards.json").read_text())
    meta["shards"].append({"name": name, "samples": 1})
    (out / "shards.json").write_text(json.dumps(meta))
    message = rf"shards.json: shards\[2\] names '{re.escape(name)}', not a plain file name in its folder"
    with pytest.raises(ValueError, match=message):
        load_shard_index(str(out))
    with pytest.raises(ValueError, match=message):
        load_shard_index(str(out / "train-{000000..000001}.tar"))  # the index beside a pattern
    with pytest.raises(ValueError, match=message + r".*remove it to write new shards here"):
        write_shards(_source(8), out, samples_per_shard=8, overwrite=True)
    assert keep.read_text() == "precious" and len(list(out.glob("train-*.tar"))) == 2


def test_overwrite_deletes_only_its_own_shard_files(tmp_path):
    write_shards(_source(8), tmp_path, samples_per_shard=2, shuffle_seed=None)  # train-000000..3.tar
    (tmp_path / "notes.txt").write_text("mine")
    meta = json.loads((tmp_path / "shards.json").read_text())
    meta["shards"].append({"name": "notes.txt", "samples": 1})  # a plain name, but not a shard of this tool
    (tmp_path / "shards.json").write_text(json.dumps(meta))
    write_shards(_source(8), tmp_path, samples_per_shard=8, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "shards.json", "train-000000.tar"]


def test_foreign_shards_without_an_index_are_not_replaced(tmp_path, capsys):
    from hvpmtl.cli import main

    foreign = tmp_path / "train-000003.tar"
    foreign.write_bytes(b"not mine")
    args = ["data", "shard", "--out", str(tmp_path), "--quiet", "backbone.img_size=32", "data.train_size=8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train-000003.tar" in err and "no shards.json" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert foreign.read_bytes() == b"not mine" and not (tmp_path / "shards.json").exists()
    assert main([*args[:4], "--prefix", "other", *args[4:]]) == 0  # other-*.tar: nothing in the way
    assert main([*args, "--overwrite"]) == 0  # replaces other-000000.tar (listed); train-000003.tar is not in the way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards.json", "train-000000.tar", "train-000003.tar"]


def _tar_with_a_link_member(path: Path) -> Path:
    """8 samples and a 9th whose image member is a symbolic link to /etc/passwd."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    label = json.dumps({"labels": ["cat"]}).encode()
    with tarfile.open(path, "w") as tar:
        for k in range(8):
            for name, data in ((f"{k:08d}.png", buf.getvalue()), (f"{k:08d}.json", label)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("00000009.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        info = tarfile.TarInfo("00000009.json")
        info.size = len(label)
        tar.addfile(info, io.BytesIO(label))
    return path


def test_link_member_is_one_line_before_the_run_folder(tmp_path, capsys):
    from hvpmtl.cli import main

    tar = _tar_with_a_link_member(tmp_path / "x-000000.tar")
    with pytest.raises(ValueError, match=r"x-000000.tar: member '00000009.png' is a link, not a file"):
        load_shard_index(str(tar))  # a pattern: its members are scanned at start
    out = tmp_path / "run"
    rc = main(_args(tar, out, "train.max_steps=1", "data.shard_streams=1", "data.batch_size=8", "data.num_workers=0"))
    err = capsys.readouterr().err
    assert rc == 2 and "00000009.png' is a link" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    index = ShardIndex([tar], [9], ["cat"], str(tmp_path / "shards.json"))  # listed: read only by the stream
    with pytest.raises(BadImageError, match=r"x-000000.tar: sample '00000009' has no image member") as info:
        list(ShardStream(index, None, global_batch=9, streams=1, shuffle_window=9))
    assert "\n" not in str(info.value) and "(json; expected one of" in str(info.value)


def test_json_nested_too_deeply_is_one_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "shards.json").write_text('{"format": "hvpmtl-shards", "shards": ' + deep + "}")
    with pytest.raises(ValueError, match=r"shards.json: not valid JSON \(nested too deeply\)"):
        load_shard_index(str(tmp_path))

    with pytest.raises(ValueError, match=r"^x.tar:00000001.json: not valid JSON \(nested too deeply\)$"):
        parse_labels(('{"labels": ' + deep + "}").encode(), "x.tar:00000001.json")
