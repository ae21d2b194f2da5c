"""A new user's first commands: ``--version``, ``presets``, ``demo --quick``."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from hvpmtl.cli import main
from hvpmtl.config import PRESET_DIR, preset_names
from hvpmtl.eval.config import ROOTS, preset_dir


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"hvpmtl {importlib.metadata.version('hvpmtl')}"


def _preset_files() -> list[Path]:
    folders = {PRESET_DIR, *(preset_dir(c) for c in ROOTS)}
    return [folder / f"{name}.yaml" for folder in sorted(folders) for name in preset_names(folder)]


@pytest.mark.parametrize("path", _preset_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_opens_with_a_one_sentence_description(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), first
    text = first[2:]
    assert len(text) <= 100, f"{len(text)} chars: {text}"
    assert text.endswith(".") and not text.endswith("..."), text


def test_presets_prints_each_description_whole(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for path in _preset_files():
        line = next(line for line in out.splitlines() if line.split()[:1] == [path.stem])
        assert line.endswith(path.read_text().splitlines()[0][2:]), line


@pytest.mark.slow
def test_demo_quick_trains_its_steps_and_prints_only_its_table(capsys, tmp_path):
    from hvpmtl.cli.pretrain import QUICK_STEPS
    from hvpmtl.engine.metrics import read_metrics

    run_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(run_dir), "train.progress=false"]) == 0
    out = capsys.readouterr().out
    assert int(read_metrics(run_dir / "metrics.csv")[-1]["step"]) == QUICK_STEPS
    table = (run_dir / "demo.md").read_text()
    for row in ("random init, both", "HVP-MTL, both", "its own MLC head"):
        assert row in table
    assert table.strip() in out  # the table printed is the one written
    assert not any(line.startswith("|") for line in out.splitlines())  # no raw per-metric markdown rows
    results = (run_dir / "eval" / "results.md").read_text()
    assert results.count("| linprobe |") == 2 and results.count("| mlc-head |") == 1
    assert f"{run_dir / 'eval' / 'results.md'}" in out
