"""The command line (cli.py): commands, presets, config errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hvpmtl.cli import main
from hvpmtl.config import load_config, preset_names, to_dict

SRC = str(Path(__file__).resolve().parents[1] / "src")


def env_with_src() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "hvpmtl", "--help"], capture_output=True, text=True, env=env_with_src())
    assert r.returncode == 0
    for cmd in ("pretrain", "demo", "presets", "config"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "hvpmtl", "pretrain", "--help"], capture_output=True, text=True,
                       env=env_with_src())  # fmt: skip
    assert "--config" in r.stdout and "--resume" in r.stdout and "key=value" in r.stdout


def test_presets(capsys):
    rc, out, _ = run(capsys, "presets")
    assert rc == 0
    for name in ("cpu-tiny", "cpu-swin-tiny", "paper-vit-b", "paper-swin-b"):
        assert name in out and name in preset_names()
    assert "cpu-tiny (default)" in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("train.max_steps=1.5", "train.max_steps: expected int"),
        ("train.precision=fp8", "train.precision='fp8'"),
        ("nonsense", "not of the form key=value"),
    ],
)
def test_bad_config_fails_with_the_key(capsys, override, message):
    rc, _, err = run(capsys, "pretrain", override)
    assert rc == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_bad_config_in_a_subprocess_exits_nonzero():
    r = subprocess.run([sys.executable, "-m", "hvpmtl", "pretrain", "tasks.mim.wieght=0"], capture_output=True,
                       text=True, env=env_with_src())  # fmt: skip
    assert r.returncode == 2
    assert "error: unknown config key 'tasks.mim.wieght'" in r.stderr and "Traceback" not in r.stderr


def test_unknown_preset_and_missing_resume(capsys):
    rc, _, err = run(capsys, "pretrain", "--config", "nope")
    assert rc == 2 and "unknown preset 'nope'" in err
    rc, _, err = run(capsys, "pretrain", "--resume", "/no/such/step_1.pt")
    assert rc == 2 and "checkpoint not found" in err


def test_config_command_prints_resolved_yaml(capsys):
    rc, out, _ = run(capsys, "config", "--config", "cpu-swin-tiny", "optim.lr=2e-4", "tasks.mim.weight=0")
    data = yaml.safe_load(out)
    assert rc == 0 and data["optim"]["lr"] == 2e-4 and data["tasks"]["mim"]["weight"] == 0
    assert data["backbone"]["name"].startswith("swin")


@pytest.mark.parametrize("name", ["paper-vit-b", "paper-swin-b", "vit-b", "swin-b"])
def test_paper_presets_hold_the_paper_values(name):  # the recommended presets keep them too
    cfg = load_config(name)
    o, t, tk = cfg.optim, cfg.train, cfg.tasks
    assert (o.lr, o.min_lr, o.weight_decay, o.warmup_epochs, o.clip_grad) == (1e-4, 1e-7, 0.05, 5.0, 5.0)
    assert t.epochs == 30 and cfg.data.batch_size == 1024 and cfg.backbone.img_size == 224
    assert cfg.data.rand_augment
    assert (tk.mlc.weight, tk.swav.weight, tk.mim.weight, tk.distill.weight) == (0.001, 0.02, 1.0, 10.0)
    assert (tk.mlc.eta, tk.mlc.gammas, tk.swav.t_max, tk.distill.momentum) == (10.0, (4.0, 1.0), 10.0, 0.995)
    assert cfg.data.dataset == "manifest"
    assert ("swin" in cfg.backbone.name) == ("swin" in name)


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name", ["vit-b", "swin-b"])
def test_recommended_presets_change_only_what_method_md_lists(name):
    paper = flat_config(to_dict(load_config(f"paper-{name}")))
    ours = flat_config(to_dict(load_config(name)))
    changed = {k for k in paper if ours[k] != paper[k]} - {"train.output_dir"}
    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    table = text.split("## Recommended presets")[1].split("\n## ")[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = {key for cell in first_cells for key in re.findall(r"`([\w.]+)`", cell)}
    assert changed and changed <= listed, f"{name} changes keys method.md does not list: {changed - listed}"
    if name == "vit-b":
        assert listed == changed, f"method.md lists keys vit-b does not change: {listed - changed}"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 is allowed on CUDA")
def test_fp16_on_cpu_is_refused(capsys, tmp_path):
    rc, _, err = run(capsys, "pretrain", "train.precision=fp16", f"train.output_dir={tmp_path}")
    assert rc == 2 and "train.precision=fp16 needs CUDA" in err


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_model(capsys, tmp_path):
    tiny = [
        "backbone.kwargs={depth: 2, embed_dim: 64, num_heads: 2}", "tasks.mlc.dim=32", "tasks.mlc.num_heads=2",
        "tasks.mlc.ffn_dim=64", "tasks.swav.hidden_dim=64", "tasks.swav.num_prototypes=16",
        "data.batch_size=16", "data.train_size=64", "data.val_size=48", "train.max_steps=4", "train.progress=false",
    ]  # fmt: skip
    rc, out, _ = run(capsys, "demo", "--output-dir", str(tmp_path / "demo"), *tiny)
    assert rc == 0
    for row in ("random init, mean of feature map", "HVP-MTL, mean of feature map", "its own MLC head"):
        assert row in out
    assert (tmp_path / "demo" / "backbone.safetensors").is_file()


def test_pretrain_and_config_take_overrides_on_both_sides_of_an_option(capsys, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("hvpmtl.pretraining.pretrain", lambda cfg, resume=None: seen.update(cfg=cfg, resume=resume))
    ckpt = str(tmp_path / "step_2.pt")
    rc, _, err = run(capsys, "pretrain", "-c", "cpu-tiny", "train.max_steps=1", "--resume", ckpt, "optim.lr=2e-4")
    assert rc == 0, err
    assert seen["resume"] == ckpt and seen["cfg"].train.max_steps == 1 and seen["cfg"].optim.lr == 2e-4
    rc, out, _ = run(capsys, "config", "optim.lr=3e-4", "-c", "cpu-swin-tiny", "tasks.mim.weight=0")
    data = yaml.safe_load(out)
    assert rc == 0 and data["optim"]["lr"] == 3e-4 and data["tasks"]["mim"]["weight"] == 0
    with pytest.raises(SystemExit):  # an unknown option is still refused
        main(["pretrain", "-c", "cpu-tiny", "train.max_steps=1", "--resume", ckpt, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
