"""``Objective.reads_labels``: which objectives need the images' tags, so that a data set without any is
refused for them (and only for them), whatever objectives are registered."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

import hvpmtl
from hvpmtl.data import build_pretrain_dataset
from hvpmtl.objectives import Objective, objective_types, register_objective, unregister_objective

OTHERS_OFF = [f"tasks.{t}.weight=0" for t in ("mlc", "swav", "mim", "distill")]


@dataclass
class TagConfig:
    weight: float = 1.0


def test_mlc_and_distillation_read_labels_swav_and_mim_do_not():
    assert {n: c.reads_labels for n, c in objective_types().items()} == {
        "mlc": True, "swav": False, "mim": False, "distill": True,
    }  # fmt: skip
    cfg = hvpmtl.load_config(None, [])
    assert cfg.tasks.label_readers() == ["tasks.mlc", "tasks.distill"]
    assert hvpmtl.load_config(None, ["tasks.mlc.weight=0"]).tasks.label_readers() == ["tasks.distill"]


@pytest.fixture
def untagged(tmp_path: Path) -> list[str]:
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("path,labels\n0.png,\n1.png,\n")
    return ["data.dataset=manifest", f"data.manifest={tmp_path / 'm.csv'}", "backbone.img_size=32",
            "tasks.mim.mask_patch_size=16", "train.output_dir=", *OTHERS_OFF]  # fmt: skip


@pytest.mark.parametrize("reads", [True, False])
def test_a_registered_objective_that_reads_labels_refuses_untagged_data(untagged: list[str], reads: bool):
    tagger = type("Tagger", (Objective,), {"reads_labels": reads})
    register_objective("tagger", TagConfig)(tagger)
    try:
        cfg = hvpmtl.load_config(None, untagged)
        assert cfg.tasks.label_readers() == (["tasks.tagger"] if reads else [])
        if reads:
            refused = r"m\.csv: no tags: .* and tasks\.tagger need tags .*set tasks\.tagger\.weight=0"
            with pytest.raises(ValueError, match=refused):
                build_pretrain_dataset(cfg)
        else:
            assert len(build_pretrain_dataset(cfg)) == 2
    finally:
        unregister_objective("tagger")
