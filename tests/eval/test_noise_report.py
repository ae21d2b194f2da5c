"""``hvpmtl noise-report``: scores, rankings and detection arithmetic by hand; the files; the command."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
import torch

from hvpmtl.cli import main
from hvpmtl.eval.noise_report import (
    NoiseReportConfig,
    Scored,
    csv_text,
    detection_table,
    format_table,
    html_text,
    pair_scores,
    rank_images,
    rank_pairs,
    thumbnail_png,
)

IMG = '<img src="data:image/png;base64,'


def test_scores_and_rankings_by_hand():
    probs = torch.tensor([[0.75, 0.25, 0.625], [0.125, 0.875, 0.0625]])
    given = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    score, missing = pair_scores(probs, given)
    assert score.tolist() == [[0.75, 0.75, 0.375], [0.875, 0.125, 0.0625]]
    assert missing.tolist() == [[True, False, False], [False, False, True]]
    assert rank_pairs(score).tolist() == [3, 0, 1, 2, 4, 5]  # the 0.75 tie: lower index first
    assert rank_images(score).tolist() == [1, 0]


def test_precision_recall_and_ap_by_hand():
    score = torch.arange(10, 0, -1, dtype=torch.float32).reshape(2, 5) / 10  # ranking = flat order
    missing = torch.tensor([[True] * 5, [False] * 5])
    flipped = torch.zeros(10, dtype=torch.bool)
    flipped[[0, 2, 7]] = True
    rows = {r["pairs"]: r for r in detection_table(score, missing, flipped.reshape(2, 5), [1, 5, 20])}

    a = rows["all"]
    assert (a["candidates"], a["errors"], a["chance"]) == (10, 3, pytest.approx(0.3))
    assert a["ap"] == pytest.approx((1 + 2 / 3 + 3 / 8) / 3)
    at = [(x["k"], x["precision"], x["recall"], x["chance_recall"]) for x in a["at"]]  # K=errors, then ks < 10
    expected = [(3, 2 / 3, 2 / 3, 0.3), (1, 1.0, 1 / 3, 0.1), (5, 0.4, 2 / 3, 0.5)]
    assert len(at) == len(expected)
    for got, want in zip(at, expected):  # pytest.approx compares flat sequences only (pytest >= 9.1)
        assert got == pytest.approx(want)

    m = rows["missing"]  # pairs 0-4, flips at 0 and 2
    assert (m["candidates"], m["errors"], m["chance"], m["ap"]) == (5, 2, 0.4, pytest.approx((1 + 2 / 3) / 2))
    assert [(x["k"], x["precision"], x["recall"]) for x in m["at"]] == [(2, 0.5, 0.5), (1, 1.0, 0.5)]

    w = rows["wrong"]  # pairs 5-9, the flip at 7 is ranked third; K=1 appears once
    assert (w["errors"], w["ap"]) == (1, pytest.approx(1 / 3))
    assert [(x["k"], x["precision"], x["recall"]) for x in w["at"]] == [(1, 0.0, 0.0)]

    text = format_table(list(rows.values()))
    assert "66.7%" in text and "30.0%" in text and "68.1%" in text


def test_no_errors_among_a_kind_gives_no_ap():
    score, missing = torch.rand(3, 4), torch.zeros(3, 4, dtype=torch.bool)
    flipped = torch.zeros(3, 4, dtype=torch.bool)
    flipped[0, 1] = True
    rows = {r["pairs"]: r for r in detection_table(score, missing, flipped, [2])}
    assert rows["missing"]["candidates"] == 0 and rows["missing"]["ap"] is None and rows["missing"]["at"] == []
    assert "no injected errors" in format_table(list(rows.values()))


def _scored(head: str = "teacher") -> Scored:
    probs = torch.tensor([[0.875, 0.75], [0.5, 0.0625], [0.25, 0.125]])
    given = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    clean = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    return Scored(probs, given, clean, ["a.png", "b&c.png", "d.png"], ["cat", "dog"], head)


def test_csv_lists_contradicted_pairs_best_first():
    rows = list(csv.reader(io.StringIO(csv_text(_scored(), min_score=0.5))))
    assert rows[0] == ["rank", "image", "index", "tag", "given", "p_teacher", "kind", "score", "image_rank",
                       "injected"]  # fmt: skip
    # scores: a.png cat 0.875 (missing), b&c dog 0.9375 (wrong), d.png cat 0.75 (wrong), b&c cat 0.5 (wrong)
    assert rows[1:] == [
        ["1", "b&c.png", "1", "dog", "1", "0.0625", "probably wrong", "0.9375", "1", "1"],
        ["2", "a.png", "0", "cat", "0", "0.8750", "probably missing", "0.8750", "2", "1"],
        ["3", "d.png", "2", "cat", "1", "0.2500", "probably wrong", "0.7500", "3", "0"],
        ["4", "b&c.png", "1", "cat", "1", "0.5000", "probably wrong", "0.5000", "1", "0"],
    ]
    assert len(list(csv.reader(io.StringIO(csv_text(_scored("student"), 0.0))))) == 1 + 6
    assert "p_student" in csv_text(_scored("student"), 0.9)


def test_thumbnail_is_a_png_of_the_asked_size():
    from PIL import Image

    image = torch.randint(0, 256, (3, 20, 40), dtype=torch.uint8)
    png = Image.open(io.BytesIO(base64.b64decode(thumbnail_png(image, 96))))
    assert png.format == "PNG" and png.size == (96, 48)


def test_html_shows_the_top_images_with_inlined_thumbnails():
    s = _scored()
    thumbs = {i: thumbnail_png(torch.full((3, 8, 8), 40 * i, dtype=torch.uint8), 16) for i in range(3)}
    table = detection_table(s.score, s.missing, s.flipped, [1])
    page = html_text(s, thumbs, 2, 0.5, "Noise report: run", ["fact one"], table)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert page.count(IMG) == 2 and f"{IMG}{thumbs[1]}" in page and thumbs[2] not in page
    assert page.index("b&amp;c.png") < page.index("a.png")  # ranked, escaped
    assert "dog: probably wrong (p 0.06)" in page and "cat: probably missing (p 0.88)" in page
    assert "Finding the injected label errors" in page and "<li>fact one</li>" in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing to fetch


def test_config_errors_name_the_key():
    from hvpmtl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="split"):
        load_config(None, ["split=holdout"], cls=NoiseReportConfig)
    with pytest.raises(ConfigError, match="min_score"):
        load_config(None, ["min_score=2"], cls=NoiseReportConfig)


def test_noise_report_command_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["noise-report", str(tiny_run), "data.label_noise=0.3", "--top", "5", "--out", str(out),
            "run.num_workers=0", "ks=[10]"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pairs" in printed and "chance" in printed and "noise_report.html" in printed
    page = (out / "noise_report.html").read_text()
    assert page.count(IMG) == 5 and "Finding the injected label errors" in page
    rows = list(csv.DictReader(io.StringIO((out / "noise_report.csv").read_text())))
    assert rows and all(float(r["score"]) >= 0.5 for r in rows) and {r["kind"] for r in rows} <= {
        "probably missing", "probably wrong"}  # fmt: skip
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    report = json.loads((out / "noise_report.json").read_text())
    assert report["images"] == 64 and report["head"] == "teacher"
    everything = report["detection"][0]
    assert everything["pairs"] == "all" and everything["candidates"] == 64 * 10 and everything["errors"] > 0


def test_noise_report_without_injected_noise_and_bad_input(tiny_run, tmp_path, capsys):
    out = tmp_path / "val"
    assert main(["noise-report", str(tiny_run), "--split", "val", "--out", str(out), "run.num_workers=0"]) == 0
    page = (out / "noise_report.html").read_text()
    assert "no injected label errors" in page and "Finding the injected" not in page
    assert page.count(IMG) == 32  # val_size 32 < the default top 50
    capsys.readouterr()
    assert main(["noise-report", str(tiny_run), "head=both"]) == 2
    assert "error: head='both'" in capsys.readouterr().err
    assert main(["noise-report", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_a_run_without_teacher_is_scored_by_the_student(tmp_path, capsys):
    import hvpmtl
    from hvpmtl.pretraining import pretrain

    from .conftest import TINY_RUN

    run = tmp_path / "no-md"
    pretrain(hvpmtl.load_config(None, [*TINY_RUN, "train.max_steps=1", "eval.knn_every=0", "tasks.distill.weight=0",
                                       "data.label_noise=0.5", f"train.output_dir={run}"]))  # fmt: skip
    assert main(["noise-report", str(run), "images=8", "--top", "3", "run.num_workers=0"]) == 0
    assert "has no teacher (tasks.distill.weight was 0): scoring with the student" in capsys.readouterr().out
    out = run / "eval" / "noise-train"
    assert (out / "noise_report.csv").read_text().startswith("rank,image,index,tag,given,p_student,")
    assert (out / "noise_report.html").read_text().count(IMG) == 3
    assert json.loads((out / "noise_report.json").read_text())["detection"][0]["candidates"] == 80


def test_csv_cells_that_would_start_a_formula_are_quoted():
    probs, given = torch.tensor([[0.9, 0.2, 0.8]]), torch.tensor([[0.0, 1.0, 0.0]])
    s = Scored(probs, given, None, ['=HYPERLINK("http://x")'], ["+cmd", "-1", "@sum"], "teacher")
    rows = list(csv.reader(io.StringIO(csv_text(s, 0.0))))
    assert {r[1] for r in rows[1:]} == {"'=HYPERLINK(\"http://x\")"}
    assert sorted(r[3] for r in rows[1:]) == ["'+cmd", "'-1", "'@sum"]
    assert rows[1][5:8] == ["0.9000", "probably missing", "0.9000"]  # numbers stay numbers


def test_trust_rule_compares_the_held_out_map_with_chance():
    from hvpmtl.eval.head_check import ranking_trusted

    assert not ranking_trusted(6.6, 2.2)  # a 134-tag tagger scoring 6.6 mAP (threshold 21.8)
    assert not ranking_trusted(21.0, 2.2) and ranking_trusted(22.0, 2.2)
    assert not ranking_trusted(59.0, 50.0) and ranking_trusted(61.0, 50.0)  # reachable at a high chance
    assert ranking_trusted(68.2, 25.0)


def test_noise_report_gives_the_held_out_map_and_warns_on_a_head_near_chance(tmp_path, capsys):
    from hvpmtl.pretraining import pretrain

    from .test_class_names import manifest_config, write_manifest

    write_manifest(tmp_path)  # random pixels: no head can tag them
    pretrain(manifest_config(tmp_path))
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["noise-report", str(tmp_path / "run"), "--out", str(out), "run.num_workers=0"]) == 0
    err = capsys.readouterr().err
    check = json.loads((out / "noise_report.json").read_text())["head_check"]
    assert check["split"] == "val" and check["images"] == 16 and check["trusted"] is False
    assert 0 < check["chance"] < check["threshold"] and 0 <= check["mAP"] < check["threshold"]
    assert "warning:" in err and "cannot be trusted" in err and f"{check['mAP']:.1f}" in err
    page = (out / "noise_report.html").read_text()
    assert "held-out mAP" in page and "cannot be trusted" in page
