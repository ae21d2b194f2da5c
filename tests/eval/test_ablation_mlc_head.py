"""hvpmtl ablate's MLC-head column, and its steps run through a runner the caller passes in
(eval/ablation.py imports nothing from the command line)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import hvpmtl.eval.ablation as ablation
from hvpmtl.eval.ablation import Ablation, evaluations


def test_ablation_module_imports_nothing_from_the_cli():
    tree = ast.parse(Path(ablation.__file__).read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m == "hvpmtl.cli" or m.startswith("hvpmtl.cli.")], modules


class FakeRunner:
    """Records each ``hvpmtl`` argv and writes what the real step would leave behind."""

    def __init__(self, scores: dict[str, float]):
        self.calls: list[list[str]] = []
        self.scores = scores

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        opts = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
        if argv[0] == "pretrain":
            Path(opts["train.output_dir"]).mkdir(parents=True)
            (Path(opts["train.output_dir"]) / "backbone.safetensors").write_bytes(b"")
        elif argv[0] == "linprobe":
            out = Path(opts["run.output_dir"])
            out.mkdir(parents=True)
            (out / "r.json").write_text(json.dumps({"metrics": {"mAP": 40.0}}))
        elif argv[0] == "mlc-head":
            cell = Path(argv[1])
            (cell / "eval").mkdir(parents=True, exist_ok=True)
            record = {"command": "mlc-head", "data": f"synthetic (val {opts['eval_images']})",
                      "metrics": {"mAP": self.scores[cell.name]}}  # fmt: skip
            (cell / "eval" / "mlc-head-synthetic-abc-student.json").write_text(json.dumps(record))
        return 0


def test_mlc_head_column_scores_only_the_mixes_that_train_mlc(tmp_path):
    runner = FakeRunner({"full-s0": 61.0, "mlc-s0": 58.5})
    evals = evaluations("synthetic", (10, 5), None)
    assert [e.name for e in evals] == ["probe synthetic", "MLC head mAP"]  # next to the probe
    plan = Ablation(tmp_path, None, [], ["full", "mlc", "mim"], [0], evals, run_command=runner)
    plan.run(log=lambda *_: None)
    heads = [c for c in runner.calls if c[0] == "mlc-head"]
    assert sorted(Path(c[1]).name for c in heads) == ["full-s0", "mlc-s0"]  # not mim, random init, pixels
    assert all("eval_images=5" in c for c in heads)
    assert sum(c[0] == "linprobe" for c in runner.calls) == 5  # 3 mixes + random init + pixels
    lines = (tmp_path / "ablation.md").read_text().splitlines()
    assert lines[0] == "| pre-training | probe synthetic | MLC head mAP |"
    assert lines[2] == "| all four (HVP-MTL) | **40.0** | **61.0** |"
    assert lines[4] == "| MIM only | **40.0** | — |"
    assert lines[5] == "| random init | **40.0** | — |" and lines[6] == "| raw pixels (no backbone) | **40.0** | — |"
    # the lead over the other MLC mix is complete although MIM has no MLC head
    assert "| MLC head mAP | MLC only | +2.5 | yes | — |" in lines

    runner.calls.clear()
    plan.run(log=lambda *_: None)  # every result is there: nothing runs again
    assert runner.calls == []


def test_mlc_head_result_must_match_the_images_asked_for(tmp_path):
    runner = FakeRunner({"full-s0": 61.0})
    plan = Ablation(tmp_path, None, [], ["full"], [0], evaluations("synthetic", (10, 5), None), run_command=runner)
    plan.run(log=lambda *_: None)
    bigger = Ablation(tmp_path, None, [], ["full"], [0], evaluations("synthetic", (10, 7), None),
                      run_command=runner)  # fmt: skip
    head = bigger.evals[1]
    assert bigger.result(head, "full", 0) is None  # scored on 5 images, not 7: run again


def test_smoke_on_a_manifest_keeps_only_the_keys_the_source_reads(tmp_path, capsys, monkeypatch):
    from hvpmtl.cli import main
    from hvpmtl.eval.ablation import smoke_overrides

    assert "data.train_size=48" in smoke_overrides("synthetic")
    assert not any(o.startswith(("data.train_size", "data.val_size")) for o in smoke_overrides("manifest"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.png", "labels": ["cat"]}\n')
    plans = []
    monkeypatch.setattr(Ablation, "run", lambda self, log=print: plans.append(self))
    rc = main(["ablate", "--smoke", "--out", str(tmp_path / "abl"), "--mixes", "full,swav", "data.dataset=manifest",
               f"data.manifest={manifest}", "data.check_files=false"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (plan,) = plans
    assert "train.max_steps=3" in plan.overrides and not any("train_size" in o for o in plan.overrides)
    assert [e.command for e in plan.evals] == ["linprobe", "mlc-head"]
