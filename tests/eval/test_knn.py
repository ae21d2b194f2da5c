"""eval/knn.py: DINO's weighted k-NN votes, by hand and on separable data."""

from __future__ import annotations

import math

import pytest
import torch

from hvpmtl.eval.knn import knn_evaluate, knn_scores


def test_votes_hand_computed():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.1]])
    scores = knn_scores(bank, labels, q, k=2, temperature=0.5)
    n = math.hypot(1.0, 0.1)
    s0, s2 = 1.0 / n, 1.1 / (n * math.sqrt(2))  # the two nearest: bank rows 0 and 2
    w0, w2 = math.exp(s0 / 0.5), math.exp(s2 / 0.5)
    assert scores[0].tolist() == pytest.approx([w0 / (w0 + w2), w2 / (w0 + w2)], abs=1e-6)
    # k = 1: only the nearest votes; a high temperature makes the votes equal
    assert knn_scores(bank, labels, q, k=1)[0].tolist() == pytest.approx([1.0, 0.0])
    flat = knn_scores(bank, labels, q, k=3, temperature=1e6)[0]
    assert flat.tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-5)


def test_chunking_does_not_change_scores():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(33, 8, generator=g)
    labels = (torch.rand(50, 4, generator=g) > 0.5).float()
    assert torch.allclose(knn_scores(bank, labels, queries, chunk=7), knn_scores(bank, labels, queries, chunk=1000))


def _clusters(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 16, generator=torch.Generator().manual_seed(99)) * 4
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, 16, generator=g), torch.eye(classes)[y]


def test_single_label_clusters_are_classified():
    xtr, ytr = _clusters(300, 5, 0)
    xte, yte = _clusters(100, 5, 1)
    r = knn_evaluate(xtr, ytr, xte, yte, k=10)
    assert set(r) == {"top1", "top5"} and r["top1"] > 95 and r["top5"] == pytest.approx(100.0)
    shuffled = knn_evaluate(xtr, ytr[torch.randperm(300)], xte, yte, k=10)
    assert shuffled["top1"] < 50  # labels unrelated to the features: near chance (20 %)


def test_multi_label_reports_map():
    xtr, ytr = _clusters(300, 4, 0)
    xte, yte = _clusters(80, 4, 1)
    multi_tr = torch.cat([ytr, ytr[:, :1]], 1)  # a 5th label equal to the 1st: two tags on some images
    multi_te = torch.cat([yte, yte[:, :1]], 1)
    r = knn_evaluate(xtr, multi_tr, xte, multi_te, k=10)
    assert "mAP" in r and r["mAP"] > 95 and "OF1_top3" in r


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from hvpmtl.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_k_larger_than_the_bank_is_reported_as_used(tiny_run, tmp_path, capsys):
    import json

    rc, out, err = _cli(capsys, "knn", str(tiny_run), "train_images=16", "eval_images=8", "knn.k=1000",
                        "run.progress=false", f"run.output_dir={tmp_path}")  # fmt: skip
    assert rc == 0, err
    assert "knn.k=1000 is larger than the bank (16 images): 16 neighbours vote" in out
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("knn-*.json")]
    assert record["settings"]["k"] == 16
    assert "| k 16, T 0.07" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_single_class_data_is_refused_before_features_are_computed(tiny_run, tmp_path, capsys, monkeypatch, command):
    import numpy as np
    from PIL import Image

    import hvpmtl.eval.frozen as frozen

    (tmp_path / "img").mkdir()
    lines = ["path,labels"]
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 30 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        lines.append(f"img/{i}.jpg,dog")
    (tmp_path / "same.csv").write_text("\n".join(lines) + "\n")

    def no_features(*args, **kwargs):
        raise AssertionError("features computed")

    monkeypatch.setattr(frozen, "extract_features", no_features)
    rc, _, err = _cli(capsys, command, str(tiny_run), "data.dataset=manifest", f"data.manifest={tmp_path}/same.csv",
                      f"data.val_manifest={tmp_path}/same.csv", f"data.root={tmp_path}",
                      "run.progress=false", f"run.output_dir={tmp_path}/out")  # fmt: skip
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "1 class ('dog')" in err and "at least 2" in err
