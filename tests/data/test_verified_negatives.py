"""Verified-absent tags (``negatives``) in manifests and shards, and ``data.unannotated`` on them:
the reader, the per-class known mask, ``hvpmtl data convert`` from Open Images, and shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from format_fixtures import oi_layout
from torchvision.io import write_png

import hvpmtl
from hvpmtl.cli import main
from hvpmtl.data import ManifestImages, build_dataset, build_pretrain_dataset, collate_pretrain
from hvpmtl.data.shard_writer import write_shards
from hvpmtl.data.shards import ShardError, ShardImages, load_shard_index, parse_labels

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
SMALL = ["backbone.img_size=32", "data.num_workers=0", "data.rand_augment=false"]
# path, labels, negatives; the vocabulary from both: bird (a negative only), cat, dog
ROWS = [("0.png", ["dog"], ["cat"]), ("1.png", [], []), ("2.png", ["cat"], ["bird"]), ("3.png", [], ["dog"])]


def _manifest(tmp_path: Path, kind: str, rows=ROWS, negatives: bool = True) -> Path:
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for i in range(len(rows)):
        write_png(torch.full((3, 40, 40), 30 * i, dtype=torch.uint8), str(root / f"{i}.png"))
    if kind == "csv":
        path = tmp_path / "m.csv"
        head = "path,labels,negatives\n" if negatives else "path,labels\n"
        lines = [f"{p},{'|'.join(t)}" + (f",{'|'.join(n)}" if negatives else "") for p, t, n in rows]
        path.write_text(head + "\n".join(lines) + "\n")
    else:
        path = tmp_path / "m.jsonl"
        objs = [{"path": p, "labels": t, **({"negatives": n} if negatives and n else {})} for p, t, n in rows]
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))  # a line without the key: no negatives
    return path


def _args(path: Path, tmp_path: Path) -> list[str]:
    return ["data.dataset=manifest", f"data.manifest={path}", f"data.root={tmp_path / 'imgs'}"]


def _batch(*overrides: str, n: int = 4) -> dict:
    ds = build_pretrain_dataset(hvpmtl.load_config(None, [*SMALL, *overrides]))
    return collate_pretrain([ds[i] for i in range(n)])


@pytest.mark.parametrize("kind", ("csv", "jsonl"))
def test_manifest_reads_negatives(tmp_path: Path, kind: str):
    ds = ManifestImages(_manifest(tmp_path, kind), tmp_path / "imgs")
    assert ds.classes == ["bird", "cat", "dog"]  # a tag seen only as a negative is still a class
    assert ds.negatives == [[1], [], [0], [2]]
    assert ds[0]["labels"].tolist() == [0, 0, 1] and ds[0]["negatives"].tolist() == [0, 1, 0]
    assert ds[1]["negatives"].tolist() == [0, 0, 0]
    (tmp_path / "p").mkdir()
    plain = ManifestImages(_manifest(tmp_path / "p", kind, negatives=False), tmp_path / "p" / "imgs")
    assert plain.negatives is None and "negatives" not in plain[0] and plain.classes == ["cat", "dog"]


@pytest.mark.parametrize("kind", ("csv", "jsonl"))
def test_tag_in_labels_and_negatives_is_a_one_line_error(tmp_path: Path, kind: str):
    m = _manifest(tmp_path, kind, [("0.png", ["cat"], []), ("1.png", ["dog", "cat"], ["dog"])])
    line = 3 if kind == "csv" else 2
    with pytest.raises(ValueError, match=rf"^{m}:{line}: tag 'dog' is in both labels and negatives") as err:
        ManifestImages(m, tmp_path / "imgs")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ("csv", "jsonl"))
def test_given_vocabulary_refuses_an_unknown_negative(tmp_path: Path, kind: str):
    m = _manifest(tmp_path, kind)
    line = 4 if kind == "csv" else 3
    with pytest.raises(ValueError, match=rf"^{m}:{line}: unknown label 'bird'"):
        ManifestImages(m, tmp_path / "imgs", classes=["cat", "dog"])


def test_jsonl_negatives_must_be_a_list_of_names(tmp_path: Path):
    m = _manifest(tmp_path, "jsonl", ROWS[:1])
    m.write_text(json.dumps({"path": "0.png", "labels": ["dog"], "negatives": "cat"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{m}:1: malformed line"):
        ManifestImages(m, tmp_path / "imgs")


@pytest.mark.parametrize("kind", ("csv", "jsonl"))
def test_unannotated_unknown_gives_a_per_class_mask(tmp_path: Path, kind: str):
    args = _args(_manifest(tmp_path, kind), tmp_path)
    batch = _batch(*args)
    assert batch["labels"].tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert batch["known"].tolist() == [
        [False, True, True],  # dog present, cat verified absent, bird unknown
        [False, False, False],  # neither: data.untagged=unknown
        [True, True, False],
        [False, False, True],  # only a verified negative: that class is known
    ]
    untagged_negative = _batch(*args, "data.untagged=negative")["known"]
    assert untagged_negative[1].all() and torch.equal(untagged_negative[[0, 2, 3]], batch["known"][[0, 2, 3]])
    per_image = _batch(*args, "data.unannotated=negative")["known"]  # every unlisted tag absent
    assert per_image.tolist() == [[True], [False], [True], [True]]  # image 1: neither, data.untagged=unknown
    assert "known" not in _batch(*args, "data.unannotated=negative", "data.untagged=negative")


@pytest.mark.parametrize("kind", ("csv", "jsonl"))
def test_unannotated_on_a_manifest_without_negatives_is_an_error(tmp_path: Path, kind: str):
    args = _args(_manifest(tmp_path, kind, negatives=False), tmp_path)
    with pytest.raises(ValueError, match=r"^data\.unannotated=negative has no effect: .* has no 'negatives'") as err:
        _batch(*args, "data.unannotated=negative")
    assert "\n" not in str(err.value)
    assert _batch(*args)["known"].shape == (4, 1)  # the default: as before


def test_openimages_convert_keeps_negatives(tmp_path: Path, capsys):
    path = oi_layout(tmp_path)  # 000a1: cat 1, dog 0, car 0.3 | 000b2: dog 1, jag2 1 | 000c3: cat 0
    out = tmp_path / "out" / "oi.jsonl"
    assert main(["data", "convert", "format=openimages", f"annotations={path}", f"root={tmp_path / 'oi/images'}",
                 f"out={out}"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["negatives"] for line in lines] == [["Dog"], [], ["Cat"]]  # every line: the source has them
    direct = ["data.dataset=openimages", f"data.annotations={path}", f"data.root={tmp_path / 'oi/images'}"]
    manifest = ["data.dataset=manifest", f"data.manifest={out}", f"data.classes_file={out.with_suffix('.classes.txt')}"]
    for extra in ([], ["data.unannotated=negative"]):
        a, b = _batch(*direct, *extra, n=3), _batch(*manifest, *extra, n=3)
        assert torch.equal(a["labels"], b["labels"])
        assert ("known" in a) == ("known" in b) and ("known" not in a or torch.equal(a["known"], b["known"]))
    assert _batch(*manifest, n=3)["known"].tolist()[2] == [True, False, False, False, False]


@pytest.mark.parametrize("extra", ([], ["data.untagged=negative"], ["data.unannotated=negative"]))
def test_shards_give_the_manifest_labels_and_known(tmp_path: Path, extra: list[str]):
    args = _args(_manifest(tmp_path, "csv"), tmp_path)
    source = build_dataset(hvpmtl.load_config(None, [*SMALL, *args]).data, 32)
    index = write_shards(source, tmp_path / "shards", samples_per_shard=3, shuffle_seed=0)
    assert index.total == 4
    shards = ["data.dataset=shards", f"data.shards={tmp_path / 'shards'}", "data.batch_size=4",
              "data.shard_streams=1", "data.shard_shuffle=1"]  # fmt: skip
    (streamed,) = list(build_pretrain_dataset(hvpmtl.load_config(None, [*SMALL, *shards, *extra])))
    mapped = _batch(*args, *extra)
    order = streamed["index"].argsort()
    assert streamed["index"][order].tolist() == [0, 1, 2, 3]
    assert torch.equal(streamed["labels"][order], mapped["labels"])
    assert ("known" in streamed) == ("known" in mapped)
    if "known" in mapped:
        assert torch.equal(streamed["known"][order], mapped["known"])
    read = ShardImages(load_shard_index(str(tmp_path / "shards")))  # random access (val split, conversion)
    by_source = {int(p.rsplit(":", 1)[1].split(".")[0]): read[k]["negatives"] for k, p in enumerate(read.paths)}
    assert {i: v.tolist() for i, v in by_source.items()} == {i: source[i]["negatives"].tolist() for i in range(4)}


def test_shards_without_negatives_refuse_unannotated(tmp_path: Path):
    args = _args(_manifest(tmp_path, "csv", negatives=False), tmp_path)
    write_shards(build_dataset(hvpmtl.load_config(None, [*SMALL, *args]).data, 32), tmp_path / "shards")
    shards = ["data.dataset=shards", f"data.shards={tmp_path / 'shards'}", "data.batch_size=4",
              "data.shard_streams=1", "data.unannotated=negative"]  # fmt: skip
    with pytest.raises(ValueError, match=r"^data\.unannotated=negative has no effect: .* no 'negatives'"):
        build_pretrain_dataset(hvpmtl.load_config(None, [*SMALL, *shards]))


def test_shard_sample_with_a_tag_in_both_lists_is_refused():
    with pytest.raises(ShardError, match=r"^x\.tar:7\.json: tag 'a' is in both labels and negatives"):
        parse_labels(b'{"labels": ["a"], "negatives": ["a"], "index": 7}', "x.tar:7.json")
