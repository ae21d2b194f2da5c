"""WebDataset shards (data/shards.py, data/shard_stream.py, engine/loader.py, `hvpmtl data shard`):
round trip, views as the map-style path draws them, each sample once per epoch over N processes x
M workers, exact resume, and pre-training from shards (1 process = 2 gloo processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hvpmtl.data import ImageLoading, ManifestImages, PretrainViews, SyntheticScenes, TwoViewTransform, read_image
from hvpmtl.data.decode import BadImageError
from hvpmtl.data.shard_stream import ShardStream
from hvpmtl.data.shard_writer import write_shards
from hvpmtl.data.shards import ShardImages, load_shard_index, scan_shard
from hvpmtl.engine.loader import ShardLoader
from hvpmtl.engine.metrics import read_metrics

pytest.importorskip("webdataset")

SRC = str(Path(__file__).resolve().parents[2] / "src")
SMALL = [
    "backbone.name=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=8",
    "backbone.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "tasks.mlc.dim=32", "tasks.mlc.num_heads=2",
    "tasks.mlc.ffn_dim=64", "tasks.mlc.num_layers=1", "tasks.mlc.dropout=0", "tasks.mlc.reduction=global_sum",
    "tasks.swav.hidden_dim=64", "tasks.swav.out_dim=16", "tasks.swav.num_prototypes=8",
    "tasks.swav.freeze_prototypes_iters=0", "tasks.mim.mask_patch_size=16", "data.batch_size=16",
    "optim.lr=1e-3", "optim.warmup_steps=3", "train.progress=false", "train.log_every=1",
]  # fmt: skip


def _source(n: int = 48, size: int = 16) -> SyntheticScenes:
    return SyntheticScenes(n, size, seed=0, stream=0)


@pytest.fixture(scope="module")
def ordered(tmp_path_factory):
    """48 scenes in source order, shards of 5 (the last holds 3): index position == source index."""
    return write_shards(_source(), tmp_path_factory.mktemp("ordered"), samples_per_shard=5, shuffle_seed=None)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    return write_shards(_source(), tmp_path_factory.mktemp("shuffled"), samples_per_shard=7, shuffle_seed=3)


def _transform() -> TwoViewTransform:
    return TwoViewTransform(16, mask_patch_size=8, rotation=0, color_jitter=0, rand_augment=False)  # cheap: crop, flip


def test_round_trip_gives_the_same_images_labels_and_index(ordered, shuffled):
    src = _source()
    meta = json.loads(Path(ordered.origin).read_text())
    assert [s["samples"] for s in meta["shards"]] == [5] * 9 + [3] and meta["samples"] == 48
    assert meta["classes"] == list(src.classes) and meta["num_tagged"] == 48
    with tarfile.open(ordered.paths[1]) as tar:
        assert tar.getnames()[:2] == ["00000005.png", "00000005.json"]
        assert json.loads(tar.extractfile("00000005.json").read())["index"] == 5
    back = ShardImages(load_shard_index(str(Path(ordered.origin).parent)))
    assert len(back) == 48 and back.classes == list(src.classes)
    for i in range(48):
        a, b = back[i], src[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"].float()), i
    # written in a seeded order: every sample once, under its source index
    mixed = ShardImages(load_shard_index(shuffled.origin))
    keys = [int(Path(p.split(":")[-1]).stem) for p in mixed.paths]
    assert sorted(keys) == list(range(48)) and keys != list(range(48))
    for p, k in enumerate(keys[:10]):
        assert torch.equal(mixed[p]["image"], src[k]["image"])


def test_jpeg_files_are_copied_byte_for_byte(tmp_path):
    rows = []
    for i, colour in enumerate(((200, 10, 10), (10, 200, 10), (10, 10, 200))):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"{i}.jpg", quality=90)
        rows.append(json.dumps({"path": f"{i}.jpg", "labels": ["a"] if i else ["a", "b"]}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    ds = ManifestImages(tmp_path / "m.jsonl")
    index = write_shards(ds, tmp_path / "shards", samples_per_shard=2)
    back = ShardImages(index)
    for p in range(3):
        i = int(Path(back.paths[p].split(":")[-1]).stem)
        assert back.raw_bytes(p) == (tmp_path / f"{i}.jpg").read_bytes()
        assert torch.equal(back[p]["image"], read_image(tmp_path / f"{i}.jpg"))
        assert torch.equal(back[p]["labels"], ds[i]["labels"])


def test_stream_views_are_those_of_the_map_style_path(shuffled):
    stream = ShardStream(shuffled, _transform(), seed=5, global_batch=8, streams=4, shuffle_window=4)
    views = PretrainViews(_source(), _transform(), seed=5)
    stream.set_epoch(2)
    batch = next(iter(stream))
    assert batch["views"][0].shape == (8, 3, 16, 16) and batch["mask"].shape == (8, 2, 2)
    for j, i in enumerate(batch["index"].tolist()):
        ref = views[(i, 2)]
        assert torch.equal(batch["views"][0][j], ref["views"][0]) and torch.equal(batch["views"][1][j], ref["views"][1])
        assert torch.equal(batch["mask"][j], ref["mask"]) and torch.equal(batch["labels"][j], ref["labels"])


def _epoch(index, world: int, workers: int, accum: int = 1, epoch: int = 0, start: int = 0, **kw) -> list:
    """Per rank, its micro-batches' indices, read through ShardLoader with ``workers`` processes."""
    out = []
    for rank in range(world):
        stream = ShardStream(index, None, seed=1, global_batch=8, streams=4, shuffle_window=kw.get("window", 5))
        stream.distribute(rank, world, accum)
        stream.check_workers(workers)
        stream.set_epoch(epoch, start)
        loader = ShardLoader(stream, workers, prefetch_factor=kw.get("prefetch", 2))
        out.append([[s["index"] for s in batch] for batch in loader])
    return out


def test_deeper_prefetch_keeps_the_batches(ordered):
    """data.prefetch_factor changes how far the workers read ahead, not what a batch holds."""
    assert _epoch(ordered, 1, 2, prefetch=5) == _epoch(ordered, 1, 2)
    stream = ShardStream(ordered, None, seed=1, global_batch=8, streams=4, shuffle_window=5)
    assert ShardLoader(stream, 2, prefetch_factor=5).loader.prefetch_factor == 5


def _join_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "shard-join"]


def test_join_thread_ends_with_the_loop_and_hands_on_worker_errors(tmp_path, ordered):
    """With several workers a thread joins the parts; it stops when the loop stops early, and a
    worker's error reaches the training thread as that error."""
    stream = ShardStream(ordered, None, seed=1, global_batch=8, streams=4, shuffle_window=5)
    batches = iter(ShardLoader(stream, 2))
    first = next(batches)
    assert len(first) == 8 and len(_join_threads()) == 1
    batches.close()  # the loop stops after one batch
    assert not _join_threads()
    index = write_shards(_source(8), tmp_path, samples_per_shard=4, shuffle_seed=None)
    offset, size = scan_shard(index.paths[1])[1][1]["png"]  # sample 5, in the second worker's shard
    with open(index.paths[1], "r+b") as f:
        f.seek(offset)
        f.write(b"x" * size)
    bad = ShardStream(index, None, global_batch=8, streams=2, shuffle_window=4)
    bad.check_workers(2)
    with pytest.raises(BadImageError, match=r"train-000001.tar:00000005.png: .*data.on_bad_image=skip"):
        list(ShardLoader(bad, 2))
    assert not _join_threads()


@pytest.mark.parametrize("world, workers, accum", [(1, 1, 1), (1, 2, 2), (2, 2, 1), (4, 0, 2)])
def test_each_sample_once_per_epoch_and_global_batches_do_not_depend_on_n_or_m(ordered, world, workers, accum):
    reference = ShardStream(ordered, None, seed=1, global_batch=8, streams=4, shuffle_window=5)
    assert reference.steps_per_epoch == 6  # 48 samples = 4 streams x 12 = 6 steps x 8
    ranks = _epoch(ordered, world, workers, accum, epoch=1)
    seen = []
    for step in range(6):
        # micro-batch a of every rank, ranks in order, then the next micro-batch: one process's global batch
        got = [i for a in range(accum) for r in range(world) for i in ranks[r][step * accum + a]]
        want = reference.global_batch_positions(1, step).tolist()
        assert sorted(got) == sorted(want)
        if accum == 1:
            assert got == want
        seen += got
    assert sorted(seen) == list(range(48))
    assert reference.global_batch_positions(1, 0).tolist() != reference.global_batch_positions(2, 0).tolist()


def test_uneven_data_drops_fewer_than_streams_plus_batch(shuffled):
    stream = ShardStream(shuffled, None, seed=0, global_batch=12, streams=4, shuffle_window=3)
    # 48 samples: 4 streams x 12; 12 // 3 = 4 steps of 12: nothing dropped; with 5 streams 3 are dropped
    five = ShardStream(shuffled, None, seed=0, global_batch=10, streams=5, shuffle_window=3)
    assert (stream.steps_per_epoch, five.steps_per_epoch) == (4, 4)
    for s, total in ((stream, 48), (five, 40)):
        pos = [p for step in range(s.steps_per_epoch) for p in s.global_batch_positions(0, step).tolist()]
        assert len(pos) == len(set(pos)) == total


def test_resume_restarts_at_the_step_and_decodes_only_what_it_yields(shuffled, monkeypatch):
    import hvpmtl.data.shard_stream as mod

    stream = ShardStream(shuffled, _transform(), seed=2, global_batch=8, streams=4, shuffle_window=5)
    stream.distribute(0, 1, 2)
    stream.set_epoch(3)
    full = list(stream)
    decoded = []
    real = mod.read_image
    monkeypatch.setattr(mod, "read_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    stream.set_epoch(3, start_step=4)
    tail = list(stream)
    assert len(full) == 12 and len(tail) == 4  # 6 steps x 2 micro-batches; resumed after 4 steps
    for a, b in zip(full[8:], tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["views"][1], b["views"][1])
    assert len(decoded) == 16  # the 2 steps x 8 samples it yields, nothing before


def test_unreadable_image_in_a_shard_is_named_or_replaced(tmp_path):
    index = write_shards(_source(8), tmp_path, samples_per_shard=4, shuffle_seed=None)
    key, members = scan_shard(index.paths[0])[1]  # sample 1
    offset, size = members["png"]
    with open(index.paths[0], "r+b") as f:
        f.seek(offset)
        f.write(b"x" * size)  # same length: the tar stays readable, the PNG does not
    kw = dict(global_batch=8, streams=1, shuffle_window=8)
    with pytest.raises(BadImageError, match=r"train-000000.tar:00000001.png: .*data.on_bad_image=skip"):
        list(ShardStream(index, None, **kw))
    stream = ShardStream(index, None, loading=ImageLoading(on_bad_image="skip"), **kw)
    with pytest.warns(UserWarning, match="skipping unreadable image .*00000001.png"):
        (batch,) = list(stream)
    src = _source(8)
    assert sorted(s["index"] for s in batch) == list(range(8)) and stream.num_skipped == 1
    batch = {s["index"]: s for s in batch}
    assert torch.equal(batch[1]["image"], src[2]["image"])  # the next one of its window stands in


def test_bad_configs_are_named(ordered, tmp_path):
    with pytest.raises(ValueError, match="data.batch_size=12 must be a multiple of data.shard_streams"):
        ShardStream(ordered, None, global_batch=12, streams=8)
    s = ShardStream(ordered, None, global_batch=8, streams=4)
    with pytest.raises(ValueError, match="data.shard_streams=4 must be a multiple of the number of processes"):
        s.distribute(0, 3)
    s.distribute(0, 2)
    with pytest.raises(ValueError, match="data.num_workers=3"):
        s.check_workers(3)
    with pytest.raises(FileNotFoundError, match="data.val_shards: .*shards.json not found"):
        load_shard_index(str(tmp_path), "data.val_shards")
    meta = json.loads(Path(ordered.origin).read_text())
    meta["shards"][0]["samples"] = 6
    (tmp_path / "shards.json").write_text(json.dumps(meta))
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).symlink_to(Path(ordered.origin).parent / name)
    meta["shards"] = meta["shards"][:2]
    (tmp_path / "shards.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="train-000000.tar: 5 samples, .* lists 6"):
        list(ShardStream(load_shard_index(str(tmp_path)), None, global_batch=11, streams=1))  # reads both to the end


def test_brace_pattern_counts_shards_and_reads_labels(ordered):
    folder = Path(ordered.origin).parent
    index = load_shard_index(str(folder / "train-{000008..000009}.tar"))
    assert index.counts == [5, 3] and index.total == 8  # listed in the shards.json beside them
    (folder / "shards.json").rename(folder / "index.json")
    try:
        scanned = load_shard_index(str(folder / "train-{000008..000009}.tar"))
    finally:
        (folder / "index.json").rename(folder / "shards.json")
    assert scanned.counts == [5, 3] and scanned.num_tagged == 8
    assert set(scanned.classes) <= set(_source().classes)
    assert [s["index"] for b in ShardStream(scanned, None, global_batch=8, streams=1) for s in b] != []


# -- pre-training from shards ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain_shards(tmp_path_factory):
    from hvpmtl.cli import main

    out = tmp_path_factory.mktemp("pretrain") / "train"
    assert main(["data", "shard", "--out", str(out), "--samples-per-shard", "10", "--quiet",
                 "backbone.img_size=32", "data.train_size=96"]) == 0  # fmt: skip
    return out


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", *SMALL, "data.dataset=shards", f"data.shards={shards}", "data.shard_shuffle=5",
            f"train.output_dir={out}", *extra]  # fmt: skip


@pytest.mark.slow
def test_pretrain_two_steps_from_shards(pretrain_shards, tmp_path, capsys):
    from hvpmtl.cli import main

    assert main(_args(pretrain_shards, tmp_path / "run", "train.max_steps=2", "data.num_workers=2")) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert "throughput" in capsys.readouterr().out
    rc = main(_args(pretrain_shards, tmp_path / "bad", "data.batch_size=12"))
    assert rc == 2 and "data.batch_size=12 must be a multiple of data.shard_streams" in capsys.readouterr().err


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_one(pretrain_shards, tmp_path):
    from hvpmtl.cli import main

    common = ["train.max_steps=8", "train.ckpt_every=2", "data.num_workers=1"]  # 6 steps per epoch
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(pretrain_shards, a, *common)) == 0
    from hvpmtl.engine.faults import inject

    with inject(stop_after=3):
        assert main(_args(pretrain_shards, b, *common)) == 1
    assert main(_args(pretrain_shards, b, *common, "train.resume=auto")) == 0
    ra, rb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, 9))
    for x, y in zip(ra, rb):
        for k in ("loss", "loss_mlc", "loss_swav", "loss_mim", "loss_distill", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "hvpmtl", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_gloo_processes_with_one_worker_match_one_process_with_two(pretrain_shards, tmp_path):
    from hvpmtl.cli import main

    common = ["train.max_steps=4", "dist.backend=gloo"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(pretrain_shards, one, *common, "data.num_workers=2")) == 0
    r = _torchrun(2, _args(pretrain_shards, two, *common, "data.num_workers=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ra, rb = read_metrics(one / "metrics.csv"), read_metrics(two / "metrics.csv")
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb):
        for k in ("loss", "loss_mlc", "loss_swav", "loss_mim", "loss_distill", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    diffs = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    assert diffs.max() < 2e-3 and diffs.median() < 1e-6, (diffs.max(), diffs.median())


def test_cli_writes_shards_and_refuses_to_overwrite_them(tmp_path, capsys):
    from hvpmtl.cli import main

    args = ["data", "shard", "--out", str(tmp_path), "--samples-per-shard", "8", "--quiet", "--split", "val",
            "backbone.img_size=32", "data.val_size=20"]  # fmt: skip
    assert main(args) == 0
    assert f"pre-train on it: hvpmtl pretrain data.dataset=shards data.val_shards={tmp_path}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards.json", "val-000000.tar", "val-000001.tar",
                                                          "val-000002.tar"]  # fmt: skip
    assert main(args) == 2 and "shards.json exists (pass --overwrite" in capsys.readouterr().err
    assert main([*args[:5], "2", *args[6:], "--overwrite"]) == 0  # fewer, larger shards: the old ones go
    assert len(list(tmp_path.glob("val-*.tar"))) == 10


def test_missing_webdataset_names_the_extra(monkeypatch, ordered):
    import hvpmtl
    from hvpmtl.data.shard_stream import pretrain_stream

    monkeypatch.setitem(sys.modules, "webdataset.tariterators", None)
    cfg = hvpmtl.load_config(None, ["data.dataset=shards", f"data.shards={ordered.origin}"])
    with pytest.raises(ValueError, match=r"pip install 'hvpmtl\[shards\]'"):
        pretrain_stream(cfg, None, None)
