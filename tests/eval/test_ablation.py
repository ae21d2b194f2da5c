"""hvpmtl ablate: task mixes, cells that resume, the table of mean ± std over seeds."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from hvpmtl.cli import build_parser, main
from hvpmtl.eval.ablation import DEFAULT_MIXES, MIXES, Ablation, Evaluation, evaluations, mean_std, mix_overrides

from .conftest import TINY_RUN


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_mixes_switch_off_the_right_tasks():
    assert mix_overrides("full") == []
    assert mix_overrides("no-swav") == ["tasks.swav.weight=0"]
    assert sorted(mix_overrides("mim")) == ["tasks.distill.weight=0", "tasks.mlc.weight=0", "tasks.swav.weight=0"]
    assert {m for m in MIXES if len(MIXES[m]) == 1} == {"no-mlc", "no-swav", "no-mim", "no-md"}  # Table 5
    assert sorted(mix_overrides("mlc-md")) == ["tasks.mim.weight=0", "tasks.swav.weight=0"]  # the supervised half


def test_default_run_is_table_5_and_each_objective_alone():
    args = build_parser().parse_args(["ablate"])
    assert args.mixes.split(",") == list(DEFAULT_MIXES) and set(DEFAULT_MIXES) == set(MIXES) - {"mlc-md"}


def test_item_columns_show_items_at_the_mosaic_scale():
    (probe,) = evaluations("synthetic", (10, 5), None, mlc_head=False)
    assert probe.command == "linprobe" and not any("item_scale" in a for a in probe.args)
    _, _, knn, item_probe = evaluations("fmnist-mosaic", (10, 5), (20, 8))
    assert knn.command == "knn" and item_probe.command == "linprobe"
    assert "data.item_scale=0.5" in knn.args and "data.item_scale=0.5" in item_probe.args
    plan = Ablation(Path("abl"), None, [], ["full"], [0], [knn, item_probe])
    assert "knn.feature=pixels" in plan.eval_args(knn, "pixels", 0)
    assert "probe.feature=pixels" in plan.eval_args(item_probe, "pixels", 0)
    assert "--random-init" in plan.eval_args(item_probe, "random", 0)


def test_table_is_mean_and_sample_std_with_the_best_in_bold(tmp_path):
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    plan = Ablation(tmp_path, "cpu-tiny", [], ["full", "mim"], [0, 1], [Evaluation("probe", "linprobe")])
    values = {("full", 0): 50.0, ("full", 1): 54.0, ("mim", 0): 40.0, ("random", 0): 30.0, ("random", 1): 32.0}
    for (mix, seed), v in values.items():
        d = plan.result_dir(plan.evals[0], mix, seed)
        d.mkdir(parents=True)
        (d / "r.json").write_text(json.dumps({"metrics": {"top1": v, "top5": 99.0}}))
    lines = plan.table().splitlines()
    assert lines[2] == "| all four (HVP-MTL) | **52.0 ± 2.8** |"
    assert lines[3] == "| MIM only | 40.0 |"  # one seed of two finished: no std
    assert lines[4] == "| random init | 31.0 ± 1.4 |"
    assert "| probe | MIM only | +10.0 | yes | — |" in lines  # paired over the one seed MIM has


def test_lead_table_pairs_seeds_finds_the_closest_mix_and_checks_the_bar(tmp_path):
    ev = Evaluation("probe", "linprobe")
    plan = Ablation(tmp_path, "cpu-tiny", [], ["full", "mlc", "mim"], [0, 1, 2], [ev])
    scores = {"full": [60.0, 62.0, 64.0], "mlc": [59.5, 60.5, 63.0], "mim": [50.0, 51.0, 52.0],
              "pixels": [58.0, 58.0, 58.0]}  # fmt: skip
    for mix, values in scores.items():
        for seed, v in enumerate(values):
            d = plan.result_dir(ev, mix, seed)
            d.mkdir(parents=True)
            (d / "r.json").write_text(json.dumps({"metrics": {"top1": v}}))
    assert plan.paired_differences("probe", "full", "mlc") == [0.5, 1.5, 1.0]
    row = plan.lead_table().splitlines()[2]
    assert row == "| probe | MLC only | +1.0 ± 0.5 | yes | +4.0 |"  # mean of the paired differences: 1.0
    assert plan.lead_table(bar=1.5).splitlines()[2].split(" | ")[3] == "no"
    for seed in (1, 2):  # MLC's cells for seeds 1 and 2 go missing: its lead is 0.5, on seed 0 alone
        for f in plan.result_dir(ev, "mlc", seed).glob("*.json"):
            f.unlink()
    assert plan.lead_table().splitlines()[2] == "| probe | MLC only | +0.5 | no | +4.0 |"
    (plan.result_dir(ev, "mlc", 0) / "r.json").unlink()  # no MLC result at all: the verdict waits
    assert plan.lead_table().splitlines()[2] == "| probe | MIM only | +11.0 ± 1.0 | — (cells missing) | +4.0 |"
    assert Ablation(tmp_path, "cpu-tiny", [], ["mlc"], [0], [ev]).lead_table() == ""


@pytest.mark.slow
def test_ablate_runs_every_cell_then_resumes_without_redoing_any(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "-c", "cpu-tiny", "--smoke", "--out", str(out), "--mixes", "full,mim", "--seeds", "0,1",
            "--no-items", *TINY_RUN]
    rc, stdout, err = run(capsys, *args)
    assert rc == 0, err
    assert stdout.count("$ hvpmtl pretrain") == 4 and stdout.count("$ hvpmtl linprobe") == 8
    for seed in (0, 1):
        tasks = yaml.safe_load((out / f"mim-s{seed}" / "config.yaml").read_text())["tasks"]
        assert [tasks[t]["weight"] for t in ("mlc", "swav", "mim", "distill")] == [0, 0, 1.0, 0]
        assert yaml.safe_load((out / f"full-s{seed}" / "config.yaml").read_text())["train"]["seed"] == seed
    values = json.loads((out / "ablation.json").read_text())
    assert set(values) == {"full", "mim", "random", "pixels"}
    column = "probe synthetic"
    assert all(len(v[column]) == 2 for v in values.values())
    assert values["random"][column][0] != values["random"][column][1]  # each seed starts from its own weights
    assert values["pixels"][column][0] == values["pixels"][column][1]  # raw pixels: the seed plays no part
    table = (out / "ablation.md").read_text()
    assert "| all four (HVP-MTL) |" in table and "| random init |" in table and " ± " in table
    assert "| raw pixels (no backbone) | " in table

    rc, stdout, err = run(capsys, *args)  # everything is there: nothing runs again
    assert rc == 0, err
    assert "$ hvpmtl" not in stdout and "| MIM only |" in stdout

    added = ["ablate", "-c", "cpu-tiny", "--smoke", "--out", str(out), "--mixes", "no-md", "--seeds", "0",
             "--no-items", *TINY_RUN]  # fmt: skip
    rc, stdout, err = run(capsys, *added)  # a mix added later reuses seed 0's baselines from full-s0
    assert rc == 0, err
    assert stdout.count("$ hvpmtl pretrain") == 1 and stdout.count("$ hvpmtl linprobe") == 1
    again = json.loads((out / "ablation.json").read_text())
    assert again["random"][column] == values["random"][column][:1] and again["pixels"][column][0] > 0
    assert not (out / "no-md-s0" / "ablate" / "probe-synthetic-random-init").exists()


@pytest.mark.slow
def test_ablate_runs_each_step_through_a_launcher(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "-c", "cpu-tiny", "--smoke", "--out", str(out), "--mixes", "mim", "--seeds", "3", "--no-items",
            "--launcher", sys.executable, *TINY_RUN]  # fmt: skip
    rc, stdout, err = run(capsys, *args)
    assert rc == 0, err
    assert (out / "mim-s3" / "backbone.safetensors").is_file()
    assert len(json.loads((out / "ablation.json").read_text())["mim"]["probe synthetic"]) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mixes", "full,nope"], "unknown task mix 'nope'"),
        (["--seeds", "0,x"], "--seeds 0,x"),
        (["tasks.mim.wieght=0"], "tasks.mim.wieght"),
    ],
)
def test_ablate_stops_on_bad_input_before_running_anything(tmp_path, capsys, extra, message):
    out = tmp_path / "abl"
    rc, _, err = run(capsys, "ablate", "--smoke", "--out", str(out), "--no-items", *extra)
    assert rc == 2 and message in err
    assert not out.exists()
