"""The downstream commands end to end: results files, chance baselines, the k-NN monitor, errors, torchrun."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from engine.conftest import torchrun
from hvpmtl.cli import main
from hvpmtl.engine.metrics import read_metrics

from .conftest import needs_fmnist

SMALL = ["data.train_size=48", "data.val_size=24", "run.progress=false", "run.num_workers=0"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def result(folder, command: str, data: str, rest: str) -> dict:
    """The newest ``<command>-<data>-<hash>-<rest>.json`` in ``folder`` (the hash names the data)."""
    paths = sorted(folder.glob(f"{command}-{data}-????????-{rest}.json"), key=lambda p: p.stat().st_mtime)
    assert paths, f"no {command}-{data}-<hash>-{rest}.json in {folder}"
    return json.loads(paths[-1].read_text())


def test_knn_writes_json_and_a_results_row(tiny_run, capsys):
    rc, out, _ = run(capsys, "knn", str(tiny_run), *SMALL, "knn.k=5")
    assert rc == 0, out
    record = result(tiny_run / "eval", "knn", "synthetic", "student-mean")
    assert record["command"] == "knn" and record["settings"]["k"] == 5
    assert set(record["metrics"]) >= {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "OF1_top3"}
    assert record["train_images"] == 48 and record["eval_images"] == 24
    table = (tiny_run / "eval" / "results.md").read_text().splitlines()
    assert table[0].startswith("| date | command |") and "| knn |" in table[-1] and "mAP" in table[-1]


def test_monitor_equals_the_knn_command_on_the_same_checkpoint(tiny_run, capsys):
    rows = {int(r["step"]): r for r in read_metrics(tiny_run / "metrics.csv")}
    assert rows[1]["knn_mAP"] != rows[1]["knn_mAP"]  # NaN: not monitored at step 1
    for teacher in (False, True):
        args = ["knn", str(tiny_run / "checkpoints" / "step_00000002.pt"), "train_images=48", "eval_images=24",
                "run.progress=false", *(["--teacher"] if teacher else [])]  # fmt: skip
        assert run(capsys, *args)[0] == 0
        record = result(tiny_run / "eval", "knn", "synthetic", f"{'teacher' if teacher else 'student'}-mean")
        key = "knn_teacher_mAP" if teacher else "knn_mAP"
        assert record["metrics"]["mAP"] == pytest.approx(rows[2][key], abs=1e-3)


def test_monitor_columns_follow_the_run(tmp_path):
    """No teacher column without a teacher (MD off); no k-NN columns in a run shorter than knn_every."""
    import hvpmtl
    from hvpmtl.pretraining import pretrain

    from .conftest import TINY_RUN

    no_md = tmp_path / "no-md"
    pretrain(hvpmtl.load_config(None, [*TINY_RUN, "train.max_steps=2", "tasks.distill.weight=0",
                                       f"train.output_dir={no_md}"]))  # fmt: skip
    rows = read_metrics(no_md / "metrics.csv")
    assert "knn_mAP" in rows[-1] and rows[-1]["knn_mAP"] == rows[-1]["knn_mAP"]  # monitored at step 2
    assert not any(k.startswith("knn_teacher") for k in rows[-1])
    short = tmp_path / "short"
    pretrain(
        hvpmtl.load_config(None, [*TINY_RUN, "train.max_steps=2", "eval.knn_every=3", f"train.output_dir={short}"])
    )
    assert not any(k.startswith("knn") for k in read_metrics(short / "metrics.csv")[-1])


@pytest.mark.slow
@needs_fmnist
def test_knn_and_linprobe_beat_chance_on_fashion_mnist(tiny_run, capsys):
    data = ["-c", "fmnist", "data.train_size=1000", "data.val_size=300", "run.progress=false"]
    assert run(capsys, "knn", str(tiny_run), *data)[0] == 0
    assert run(capsys, "linprobe", str(tiny_run), *data, "probe.epochs=50")[0] == 0
    assert run(capsys, "linprobe", "--random-init", str(tiny_run), *data, "probe.epochs=50")[0] == 0
    ev = tiny_run / "eval"
    for name in ("knn-fmnist-student-mean", "linprobe-fmnist-student-both", "linprobe-fmnist-random-init-both"):
        command, _, rest = name.split("-", 2)
        record = result(ev, command, "fmnist", rest)
        assert set(record["metrics"]) == {"top1", "top5"}
        assert record["metrics"]["top1"] > 30, name  # chance: 10 %
        assert record["eval_images"] == 300


def test_mlc_head_scores_the_pretrained_tagger(tiny_run, capsys):
    rc, out, err = run(capsys, "mlc-head", str(tiny_run), "eval_images=24")
    assert rc == 0, err
    record = result(tiny_run / "eval", "mlc-head", "synthetic", "val24-student")
    assert {"mAP", "CF1", "OF1", "CF1_top3", "positives"} <= set(record["metrics"])


def test_mlc_head_on_its_training_images_is_another_result(tiny_run, tmp_path, capsys):
    # eval_split=train scores the head on the images it trained on; each split and size is its own
    # file (the same name used to be overwritten), and run.output_dir / run.batch_size are honoured
    out = tmp_path / "heads"
    for args in (["eval_images=24"], ["eval_split=train", "eval_images=24", "run.batch_size=5"]):
        rc, _, err = run(capsys, "mlc-head", str(tiny_run), *args, f"run.output_dir={out}")
        assert rc == 0, err
    val = result(out, "mlc-head", "synthetic", "val24-student")
    train = result(out, "mlc-head", "synthetic", "train24-student")
    assert val["data"].endswith("(val 24)") and train["data"].endswith("(train 24)")
    assert val["metrics"]["positives"] != train["metrics"]["positives"]  # other images


UNUSED_BY_MLC_HEAD = ["train_images=5", "probe.feature=mean", "knn.k=3", "run.precision=bf16", "eval_split=all"]


@pytest.mark.parametrize("key", UNUSED_BY_MLC_HEAD)
def test_mlc_head_refuses_keys_it_does_not_use(tiny_run, capsys, key):
    rc, _, err = run(capsys, "mlc-head", str(tiny_run), "eval_images=24", key)
    assert rc == 2 and key.split(".")[0].split("=")[0] in err and err.count("\n") == 1


def test_bad_sources_and_data_fail_early_and_clearly(tiny_run, tmp_path, capsys):
    junk = tmp_path / "step_00000001.pt"
    junk.write_bytes(b"\x80\x02junk")
    rc, _, err = run(capsys, "knn", str(junk), *SMALL)
    assert rc == 2 and "cannot read this checkpoint" in err and "weights_only=False" not in err
    # a backbone file whose stored config does not match its tensors
    state = load_file(str(tiny_run / "backbone.safetensors"))
    cfg = {
        "name": "vit_tiny_patch16_224",
        "img_size": 32,
        "patch_size": 8,
        "kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2},
    }
    bad = tmp_path / "backbone.safetensors"
    save_file(state, str(bad), metadata={"format": "timm", "backbone_config": json.dumps(cfg)})
    rc, _, err = run(capsys, "knn", str(bad), *SMALL)
    assert rc == 2 and "do not fit this backbone" in err and "blocks.2" in err
    rc, _, err = run(capsys, "linprobe", str(tiny_run), "data.dataset=manifest", f"data.manifest={tmp_path}/none.csv")
    assert rc == 2 and "data.manifest" in err
    rc, _, err = run(capsys, "knn", str(tiny_run), str(tmp_path), *SMALL)
    assert rc == 2 and "one SOURCE" in err
    rc, _, err = run(capsys, "finetune", str(tiny_run), "finetune.layer_decay=2")
    assert rc == 2 and "finetune.layer_decay" in err


@pytest.mark.slow
def test_knn_under_torchrun_equals_one_process(tiny_run, tmp_path):
    outs = []
    for n in (1, 2):
        r = torchrun(n, ["knn", str(tiny_run), *SMALL, f"run.output_dir={tmp_path / str(n)}"])
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(result(tmp_path / str(n), "knn", "synthetic", "student-mean")["metrics"])
    assert outs[0] == pytest.approx(outs[1], abs=1e-4)


@pytest.mark.slow
def test_finetune_under_torchrun(tiny_run, tmp_path):
    args = ["finetune", str(tiny_run), "data.train_size=64", "data.val_size=32", "data.batch_size=16",
            "data.num_workers=0", "train.epochs=1", "train.progress=false",
            f"train.output_dir={tmp_path / 'ft'}"]  # fmt: skip
    r = torchrun(2, args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ft" / "eval.csv").is_file() and len(
        (tmp_path / "ft" / "metrics.csv").read_text().splitlines()
    ) == 5
    record = result(tiny_run / "eval", "finetune", "synthetic", "student")
    assert "mAP" in record["metrics"] and record["train_images"] == 64


def test_finetune_again_resumes_and_overwrite_replaces(tiny_run, tmp_path, capsys):
    args = ["finetune", str(tiny_run), "data.train_size=32", "data.val_size=16", "data.batch_size=16",
            "data.num_workers=0", "train.epochs=1", "train.progress=false",
            f"train.output_dir={tmp_path / 'ft'}"]  # fmt: skip
    assert run(capsys, *args)[0] == 0
    rc, out, _ = run(capsys, *args)  # the same command: the finished run is resumed, nothing retrained
    assert rc == 0 and "resumed finetune from" in out
    rc, out, _ = run(capsys, *args, "--overwrite")
    assert rc == 0 and "removed the previous run's" in out and "resumed" not in out
    starts = (tmp_path / "ft" / "environment.jsonl").read_text().splitlines()
    assert len(starts) == 1 and '"start_step": 0' in starts[0]  # a new run, not a third start of the old one


@pytest.mark.parametrize("fmt, ann", [("coco", "annotations/instances_val.json"), ("ade20k", "annotations/validation")])
def test_data_export_writes_the_layout_detect_and_segment_read(tmp_path, capsys, fmt, ann):
    args = ["data", "export", "--format", fmt, "--out", str(tmp_path), "--img-size", "32",
            "data.dataset=synthetic", "data.train_size=4", "data.val_size=3"]  # fmt: skip
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert (tmp_path / ann).exists() and "val: 3 images" in out
    if fmt == "coco":
        from hvpmtl.data.coco import CocoInstances

        data = CocoInstances(tmp_path, "val")
        assert len(data) == 3 and data.classes[0] == "circle"
    else:
        from hvpmtl.data.ade import ADESegmentation

        assert len(ADESegmentation(tmp_path, "training")) == 4
    rc, _, err = run(capsys, "data", "export", "--format", fmt, "--out", str(tmp_path), "data.dataset=manifest")
    assert rc == 2 and "only the built-in" in err
