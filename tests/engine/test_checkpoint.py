"""Checkpoints (engine/checkpoint.py): atomic writes, weights_only loading, RNG, exports."""

from __future__ import annotations

import argparse
import errno
import io
import os
import random

import numpy as np
import pytest
import torch

import hvpmtl
from hvpmtl.config import to_dict
from hvpmtl.engine import checkpoint as ck
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.optim import build_optimizer
from hvpmtl.runs import Run

from .conftest import TINY


def _model_and_opt():
    cfg = hvpmtl.load_config("cpu-tiny", [o for o in TINY if o.startswith(("backbone", "tasks"))])
    torch.manual_seed(0)
    model = hvpmtl.build(cfg, num_classes=10)
    return cfg, model, build_optimizer(model, cfg.optim, torch.device("cpu"))


def _step(cfg, model, opt):
    g = torch.Generator().manual_seed(0)
    batch = {
        "views": [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)],
        "mask": hvpmtl.mask_generator(cfg)(4, generator=g),
        "labels": (torch.rand(4, 10, generator=g) < 0.3).float(),
    }
    model(batch)["loss"].backward()
    opt.step()
    opt.zero_grad()
    model.after_step()


def test_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    cfg, model, opt = _model_and_opt()
    _step(cfg, model, opt)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.checkpoint_path(tmp_path, 1)
    ck.save_checkpoint(path, model, opt, None, {"step": 1}, to_dict(cfg), DistEnv())
    expected = (random.random(), np.random.rand(), torch.rand(1))

    state = torch.load(path, weights_only=True)  # plain tensors and types only
    assert state["step"] == 1 and state["config"]["backbone"]["img_size"] == 64
    _, model2, opt2 = _model_and_opt()
    ck.restore(ck.load_checkpoint(path), model2, opt2, None, DistEnv())
    assert model2.iteration == 1
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, msg=k)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert set(s1) == set(s2)
    for i in s1:
        torch.testing.assert_close(s1[i]["exp_avg"], s2[i]["exp_avg"], msg=str(i))
        torch.testing.assert_close(s1[i]["step"], s2[i]["step"])


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.pt"
    ck.atomic_write(path, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left


def test_latest_and_pruning(tmp_path):
    assert ck.find_latest(tmp_path) is None
    for step in (5, 100, 20):
        ck.atomic_write(ck.checkpoint_path(tmp_path, step), lambda f: f.write(b""))
    (tmp_path / "checkpoints" / "notes.txt").write_text("kept")
    assert ck.find_latest(tmp_path).name == "step_00000100.pt"
    ck.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [20, 100]
    assert (tmp_path / "checkpoints" / "notes.txt").exists()


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="not an hvpmtl checkpoint"):
        ck.load_checkpoint(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_exported_backbone_is_timm_loadable(tmp_path):
    import timm
    from safetensors.torch import load_file

    cfg, model, opt = _model_and_opt()
    _step(cfg, model, opt)
    paths = ck.export_weights(tmp_path, model, to_dict(cfg), DistEnv())
    net = timm.create_model(cfg.backbone.name, img_size=64, patch_size=8, num_classes=0, **cfg.backbone.kwargs)
    net.load_state_dict(load_file(paths["backbone"]))  # strict: exactly timm's keys
    backbone = Run(paths["backbone"]).backbone()  # config read from the file's metadata
    x = torch.randn(2, 3, 64, 64)
    model.eval(), backbone.eval()
    torch.testing.assert_close(backbone(x)[1], model.backbone(x)[1])
    full = load_file(paths["model"])
    assert "teacher.backbone.model.cls_token" in full


# ----------------------------------------------------------------------------------------------
# verification, fallback, disk full, unsafe files


def _two_checkpoints(tmp_path):
    """A run folder with good checkpoints at steps 1 and 2 (with their checksums)."""
    cfg, model, opt = _model_and_opt()
    for step in (1, 2):
        path = ck.checkpoint_path(tmp_path, step)
        ck.save_checkpoint(path, model, opt, None, {"step": step}, to_dict(cfg), DistEnv())
    return ck.checkpoint_path(tmp_path, 1), ck.checkpoint_path(tmp_path, 2)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate, "checksum mismatch"),
        (_flip_byte, "checksum mismatch"),
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: (p.write_bytes(os.urandom(4096)), ck.checksum_path(p).unlink()), "not a complete checkpoint"),
        (lambda p: (_truncate(p), ck.checksum_path(p).unlink()), "not a complete checkpoint"),
    ],
    ids=["truncated", "flipped-byte", "empty", "random-bytes", "truncated-no-checksum"],
)
def test_damaged_checkpoint_is_named_and_auto_resume_falls_back(tmp_path, capsys, damage, why):
    from hvpmtl.engine.run_dir import plan_run, unlock_run_dir

    good, latest = _two_checkpoints(tmp_path)
    damage(latest)
    with pytest.raises(ck.CheckpointError) as err:  # an explicit --resume PATH: an error naming the file
        ck.load_checkpoint(latest)
    assert str(err.value).startswith(f"{latest}: ") and why in str(err.value)

    path, state = plan_run(tmp_path, "auto", overwrite=False)  # train.resume=auto: the newest good one
    unlock_run_dir(tmp_path)
    assert path == good and state["step"] == 1
    out = capsys.readouterr().out
    assert f"skipped damaged checkpoint {latest} ({why}" in out and "resuming from the newest good" in out
    assert [p.name for _, p in ck.list_checkpoints(tmp_path)] == [good.name]  # set aside as *.bad
    assert latest.with_name(latest.name + ".bad").exists()


def test_foreign_file_named_like_the_newest_checkpoint_is_not_chosen(tmp_path, capsys):
    from hvpmtl.engine.run_dir import plan_run, unlock_run_dir

    _, latest = _two_checkpoints(tmp_path)
    foreign = ck.checkpoint_path(tmp_path, 99999999)
    foreign.write_bytes(os.urandom(1000))
    assert plan_run(tmp_path, "auto", overwrite=False)[0] == latest
    unlock_run_dir(tmp_path)
    assert "skipped damaged checkpoint" in capsys.readouterr().out


def test_no_good_checkpoint_is_an_error(tmp_path):
    from hvpmtl.engine.run_dir import plan_run

    for path in _two_checkpoints(tmp_path):
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="train.resume=auto: no usable checkpoint .*step_00000002.pt: empty file"):
        plan_run(tmp_path, "auto", overwrite=False)
    assert len(ck.list_checkpoints(tmp_path)) == 2  # nothing renamed when nothing can be resumed


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    good, _ = _two_checkpoints(tmp_path)
    cfg, model, opt = _model_and_opt()

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "open", lambda path, mode: FullDisk(path, "w"), raising=False)
    path = ck.checkpoint_path(tmp_path, 3)
    with pytest.raises(ck.DiskFullError) as err:
        ck.save_checkpoint(path, model, opt, None, {"step": 3}, to_dict(cfg), DistEnv())
    msg = str(err.value)
    assert msg.startswith(f"disk full (ENOSPC) while writing checkpoint {path}") and "step_00000002.pt" in msg
    assert "train.resume=auto" in msg and err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000001.pt", "step_00000001.pt.sha256", "step_00000002.pt", "step_00000002.pt.sha256",
    ]  # fmt: skip
    monkeypatch.undo()
    assert ck.load_checkpoint(good)["step"] == 1


def test_stale_temporary_files_are_never_checkpoints_and_are_removed(tmp_path, capsys):
    from hvpmtl.engine.run_dir import open_run_dir, unlock_run_dir

    _, latest = _two_checkpoints(tmp_path)
    stale = [tmp_path / "checkpoints" / ".step_00000009.pt.tmp4242", tmp_path / ".model.safetensors.tmp4242"]
    for p in stale:
        p.write_bytes(b"half written")
    assert ck.find_latest(tmp_path) == latest
    open_run_dir(tmp_path, overwrite=False)
    unlock_run_dir(tmp_path)
    assert not any(p.exists() for p in stale)
    assert "removed 2 temporary file(s) left by interrupted writes" in capsys.readouterr().out


def test_pickled_objects_are_refused_without_torch_advice(run_cli, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "model": argparse.Namespace(x=1)}, path)
    with pytest.raises(ck.CheckpointError, match="not a checkpoint written by hvpmtl, or unsafe"):
        ck.load_checkpoint(path)
    rc, _, err = run_cli("pretrain", "-c", "cpu-tiny", "--resume", str(path), f"train.output_dir={tmp_path / 'run'}")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert str(path) in err and "nothing was loaded" in err
    assert "weights_only" not in err and "pickle" not in err.replace("pickled", "")
    assert not (tmp_path / "run").exists()


def test_check_fits_names_missing_unexpected_and_misshaped_keys():
    saved = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)).state_dict()
    model = torch.nn.Sequential(torch.nn.Linear(2, 4))
    with pytest.raises(ck.CheckpointError) as err:
        ck.check_fits(saved, model, "ck.pt", ["backbone.kwargs"])
    msg = str(err.value)
    assert msg.startswith("ck.pt does not fit this model: 2 unexpected keys (1.weight, 1.bias)")
    assert "2 shape mismatches (0.weight: checkpoint [3, 2] vs model [4, 2], 0.bias" in msg
    assert "the config differs in backbone.kwargs" in msg
    ck.check_fits(model.state_dict(), model, "ck.pt")  # a fitting state passes


@pytest.mark.slow
def test_auto_resume_skips_a_truncated_latest_checkpoint_end_to_end(run_cli, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, "backbone.kwargs={depth: 1, embed_dim: 64, num_heads: 2}", "train.ckpt_every=2"]
    assert run_cli("pretrain", *common, "train.max_steps=4", f"train.output_dir={out}")[0] == 0
    latest = out / "checkpoints" / "step_00000004.pt"
    _truncate(latest)
    rc, _, err = run_cli("pretrain", "--resume", str(latest), "train.max_steps=6")
    assert rc == 2 and f"error: {latest}: checksum mismatch" in err
    rc, stdout, _ = run_cli("pretrain", *common, "train.max_steps=6", f"train.output_dir={out}", "train.resume=auto")
    assert rc == 0 and f"skipped damaged checkpoint {latest}" in stdout
    assert f"resumed from {out / 'checkpoints' / 'step_00000002.pt'} at step 2" in stdout
    assert [s for s, _ in ck.list_checkpoints(out)] == [4, 6]
