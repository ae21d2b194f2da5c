"""Pictures (hvpmtl/viz, ``hvpmtl visualize``, ``train.pictures_every``): sizes and contents."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

import hvpmtl
from conftest import TINY_VIT, tiny_config
from hvpmtl.cli import main
from hvpmtl.config import ConfigError
from hvpmtl.engine.metrics import read_metrics
from hvpmtl.objectives.mlc import MLCConfig, Query2LabelDecoder
from hvpmtl.viz import curves
from hvpmtl.viz.attention import attention_grid
from hvpmtl.viz.grid import CAPTION_H, CAPTION_W, PAD, heat_colors, overlay
from hvpmtl.viz.recon import MASK_GREY, paste, recon_grid, reconstruction_rows

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_paste_is_input_on_visible_and_reconstruction_on_masked_units():
    images, recon = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8) + 2
    mask = torch.tensor([[[True, False], [False, False]], [[False, True], [True, True]]])
    out = paste(images, recon, mask)
    assert torch.equal(out[0, :, :4, :4], recon[0, :, :4, :4])
    assert torch.equal(out[0, :, 4:, :], images[0, :, 4:, :]) and torch.equal(out[0, :, :4, 4:], images[0, :, :4, 4:])
    assert torch.equal(out[1, :, :4, :4], images[1, :, :4, :4])
    assert torch.equal(out[1, :, 4:, :], recon[1, :, 4:, :]) and torch.equal(out[1, :, :4, 4:], recon[1, :, :4, 4:])


def _tile(picture: torch.Tensor, row: int, col: int, tile: int, left: int = 0, band: int = 0) -> torch.Tensor:
    y, x = PAD + row * (tile + band + PAD) + band, left + PAD + col * (tile + PAD)
    return picture[:, y : y + tile, x : x + tile]


def test_recon_grid_has_exact_size_and_rows():
    cfg = tiny_config()  # 32 px images, 16 px mask units: a 2 x 2 mask grid
    torch.manual_seed(0)
    model = hvpmtl.build(cfg).eval()
    images = torch.randn(3, 3, 32, 32)
    mask = torch.tensor([[[True, False], [False, True]]] * 3)
    picture = recon_grid(model, images, mask, MEAN, STD, scale=2)
    assert picture.dtype == torch.uint8
    assert tuple(picture.shape) == (3, 4 * (64 + PAD) + PAD, CAPTION_W + 3 * (64 + PAD) + PAD)
    rows = reconstruction_rows(model, images, mask, MEAN, STD)
    assert torch.equal(rows[3, :, :, :16, 16:], rows[0, :, :, :16, 16:])  # visible: the input
    assert torch.equal(rows[3, :, :, :16, :16], rows[2, :, :, :16, :16])  # masked: the reconstruction
    assert torch.equal(rows[1, :, :, :16, :16], torch.full_like(rows[1, :, :, :16, :16], MASK_GREY))
    for j in range(3):
        inp, masked, rec, pasted = (_tile(picture, r, j, 64, left=CAPTION_W) for r in range(4))
        assert torch.equal(pasted[:, :32, 32:], inp[:, :32, 32:]) and torch.equal(pasted[:, 32:, :32], inp[:, 32:, :32])
        assert torch.equal(pasted[:, :32, :32], rec[:, :32, :32]) and torch.equal(pasted[:, 32:, 32:], rec[:, 32:, 32:])
        assert (masked[:, :32, :32] == 128).all() and torch.equal(masked[:, :32, 32:], inp[:, :32, 32:])
        assert not torch.equal(rec, inp)


def test_cross_attention_of_a_hand_built_decoder_looks_where_its_class_is():
    # one head, identity projections, label query c = e_c: the score of (c, pixel) is memory[pixel, c] plus
    # a sine position term in [-1, 1], so a 40 in channel c at one pixel draws all of query c's attention
    dec = Query2LabelDecoder(8, 3, MLCConfig(dim=8, num_heads=1, ffn_dim=8, num_layers=1, dropout=0.0)).eval()
    attn = dec.layers[0].cross_attn
    with torch.no_grad():
        for lin in (dec.input_proj, attn.q, attn.k):
            lin.weight.copy_(torch.eye(8).view_as(lin.weight))
            lin.bias.zero_()
        dec.label_embed.weight.copy_(torch.eye(8)[:3])
    fmap = torch.zeros(2, 8, 4, 5)
    spots = {0: (0, 0), 1: (3, 4), 2: (2, 1)}
    for c, (y, x) in spots.items():
        fmap[0, c, y, x] = 40.0
    fmap[1] = fmap[0].flip(-1)
    logits, maps = dec.cross_attention(fmap)
    assert maps.shape == (2, 3, 4, 5) and logits.shape == (2, 3)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 3))
    for c, (y, x) in spots.items():
        assert maps[0, c, y, x] > 0.99 and maps[1, c, y, 4 - x] > 0.99, c


def test_cross_attention_weights_are_the_ones_the_decoder_applies():
    torch.manual_seed(0)
    cfg = MLCConfig(dim=16, num_heads=1, ffn_dim=32, num_layers=2, self_attn=True)
    dec = Query2LabelDecoder(12, 5, cfg).eval()
    fmap = torch.randn(2, 12, 3, 4)
    logits, maps = dec.cross_attention(fmap)
    torch.testing.assert_close(logits, dec(fmap)[0])
    # one head: the attention output is proj(weights @ v(memory))
    attn = dec.layers[0].cross_attn
    q, k = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    w = attn.weights(q, k)
    torch.testing.assert_close(attn.proj(w[:, 0] @ attn.v(k)), attn(q, k, k))
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 5))


def test_heat_colours_run_dark_to_bright():
    heat = torch.linspace(0, 1, 11).view(1, 11)
    brightness = heat_colors(heat).sum(0)[0]
    assert (brightness[1:] > brightness[:-1]).all()
    torch.testing.assert_close(heat_colors(torch.ones(1, 1))[:, 0, 0], torch.tensor([252, 255, 164]) / 255)


def test_attention_grid_size_hot_spot_and_caption_colours():
    images = torch.full((2, 3, 16, 16), 0.5)
    probs = torch.tensor([[0.9, 0.1, 0.6, 0.2], [0.1, 0.8, 0.3, 0.7]])
    maps = torch.zeros(2, 4, 4, 4)
    maps[0, 0, 1, 2] = 1.0  # image 0, top label 0: one hot cell (rows 4-7, columns 8-11 of the image)
    maps[0, 2] = 1 / 16
    maps[1, :, 3, 0] = 1.0
    labels = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
    picture = attention_grid(images, probs, maps, ["a", "b", "c", "d"], labels, top_k=2, scale=3)
    t = 48
    assert tuple(picture.shape) == (3, 2 * (t + CAPTION_H + PAD) + PAD, 3 * (t + PAD) + PAD)
    first = _tile(picture, 0, 0, t, band=CAPTION_H)
    assert (first == 128).all()  # the image itself, no overlay
    hot = _tile(picture, 0, 1, t, band=CAPTION_H).float().sum(0)  # label "a": brightest in its cell
    y, x = divmod(int(hot.argmax()), t)
    assert 4 * 3 <= y < 8 * 3 and 8 * 3 <= x < 12 * 3, (y, x)
    assert hot[0, 0] < hot[y, x] - 100
    uniform = _tile(picture, 0, 2, t, band=CAPTION_H)  # label "c": a flat map is one colour
    assert (uniform == uniform[:, :1, :1]).all()
    expected = overlay(images[:1], torch.ones(1, 16, 16))[0, :, 0, 0]
    torch.testing.assert_close(uniform[:, 0, 0].float() / 255, expected, atol=1 / 255, rtol=0)

    def band(row: int, col: int) -> torch.Tensor:
        y0, x0 = PAD + row * (t + CAPTION_H + PAD), PAD + col * (t + PAD)
        return picture[:, y0 : y0 + CAPTION_H, x0 : x0 + t].int()

    true, false = band(0, 1), band(0, 2)  # "a" is a label of image 0, "c" is not
    assert ((true[1] - true[0]) > 60).any() and not ((true[0] - true[1]) > 60).any()
    assert ((false[0] - false[1]) > 60).any() and not ((false[1] - false[0]) > 60).any()


def _write_metrics(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_curves_png_from_a_hand_written_metrics_csv(tmp_path):
    pytest.importorskip("matplotlib")
    nan = float("nan")
    rows = [
        {"step": s, "epoch": s / 10, "lr": 1e-3 * s / 40, "wd": 0.05, "loss": 3.0 / s, "loss_mlc": 20.0 / s,
         "loss_mim": 0.5, "swav_collapse": 0.2, "grad_share_mlc": 0.3 if s % 10 == 0 else nan,
         "grad_share_mim": 0.7 if s % 10 == 0 else nan, "grad_cos_mlc_mim": -0.1 if s % 10 == 0 else nan,
         "knn_mAP": nan, "grad_norm": 1.0, "img_per_s": 100.0,
         "skipped_steps": 0}
        for s in range(1, 41)
    ]  # fmt: skip
    _write_metrics(tmp_path / "metrics.csv", rows)
    spec = curves.panels(read_metrics(tmp_path / "metrics.csv"))
    assert [(title, cols) for title, cols, _ in spec] == [
        ("losses", ["loss", "loss_mlc", "loss_mim"]),
        ("learning rate", ["lr"]),
        ("SwAV collapse (1 = uniform predictions)", ["swav_collapse"]),
        ("share of the backbone gradient", ["grad_share_mlc", "grad_share_mim"]),
        ("cosine between objectives' gradients", ["grad_cos_mlc_mim"]),
    ]  # knn_mAP: never logged, no panel
    (tmp_path / "eval").mkdir()
    result = {"command": "knn", "data": "synthetic (64 -> 32)", "weights": "run student step 40",
              "metrics": {"mAP": 51.234}, "settings": {}}  # fmt: skip
    (tmp_path / "eval" / "knn-synthetic-student.json").write_text(json.dumps(result))
    assert curves.downstream_results(tmp_path) == ["knn | synthetic (64 -> 32) | run student step 40: mAP 51.23"]
    out = curves.plot_curves(tmp_path, tmp_path / "pictures" / "curves.png")
    assert curves.figure_size(5, 1) == (1000, 982)
    assert Image.open(out).size == (1000, 982)
    (tmp_path / "eval" / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        curves.plot_curves(tmp_path, tmp_path / "c.png")


def test_picture_keys_are_checked():
    with pytest.raises(ConfigError, match="train.pictures_every"):
        hvpmtl.load_config(None, ["train.pictures_every=-1"])
    with pytest.raises(ConfigError, match="train.pictures_count"):
        hvpmtl.load_config(None, ["train.pictures_count=0"])


def test_paper_presets_draw_no_pictures():
    for name in ("paper-vit-b", "paper-swin-b"):
        assert hvpmtl.load_config(name).train.pictures_every == 0


# -- a short real run ------------------------------------------------------------------------------
RUN = [
    *[o for o in TINY_VIT if not o.startswith("data.num_classes")],
    "data.batch_size=8", "data.train_size=32", "data.val_size=8", "data.num_workers=0", "optim.warmup_steps=1",
    "train.max_steps=3", "train.log_every=1", "train.progress=false", "eval.knn_every=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_with_pictures(tmp_path_factory):
    from hvpmtl.pretraining import pretrain

    out = tmp_path_factory.mktemp("viz") / "run"
    pretrain(hvpmtl.load_config(None, [*RUN, "train.pictures_every=2", "train.pictures_count=3",
                                       f"train.output_dir={out}"]))  # fmt: skip
    return out


@pytest.mark.slow
def test_pictures_during_training_do_not_change_the_run(run_with_pictures, tmp_path):
    from hvpmtl.pretraining import pretrain

    names = sorted(p.name for p in (run_with_pictures / "pictures").iterdir())
    # every 2 steps and at the last one; 32 px images enlarged 4x; 3 images
    assert names == ["attention_step_00000002.png", "attention_step_00000003.png",
                     "recon_step_00000002.png", "recon_step_00000003.png"]  # fmt: skip
    recon = Image.open(run_with_pictures / "pictures" / "recon_step_00000003.png")
    assert recon.size == (CAPTION_W + 3 * (128 + PAD) + PAD, 4 * (128 + PAD) + PAD)
    attention = Image.open(run_with_pictures / "pictures" / "attention_step_00000003.png")
    assert attention.size == (4 * (128 + PAD) + PAD, 3 * (128 + CAPTION_H + PAD) + PAD)
    plain = tmp_path / "plain"
    pretrain(hvpmtl.load_config(None, [*RUN, f"train.output_dir={plain}"]))
    assert not (plain / "pictures").exists()
    a, b = read_metrics(run_with_pictures / "metrics.csv"), read_metrics(plain / "metrics.csv")
    assert [{k: v for k, v in r.items() if k != "img_per_s"} for r in a] == [
        {k: v for k, v in r.items() if k != "img_per_s"} for r in b
    ]


@pytest.mark.slow
def test_visualize_commands(run_with_pictures, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.png"
    assert main(["visualize", "recon", str(run_with_pictures), "-n", "2", "--scale", "1", "-o", str(out)]) == 0
    assert Image.open(out).size == (CAPTION_W + 2 * (32 + PAD) + PAD, 4 * (32 + PAD) + PAD)
    ckpt = run_with_pictures / "checkpoints" / "step_00000003.pt"
    assert main(["visualize", "attention", str(ckpt), "-n", "2", "--top-k", "4", "--teacher"]) == 0
    assert Image.open(run_with_pictures / "pictures" / "attention.png").size == (
        5 * (128 + PAD) + PAD, 2 * (128 + CAPTION_H + PAD) + PAD)  # fmt: skip
    assert main(["visualize", "curves", str(run_with_pictures)]) == 0
    assert Image.open(run_with_pictures / "pictures" / "curves.png").size == curves.figure_size(3, 0)
    capsys.readouterr()
    assert main(["visualize", "recon", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such run folder" in capsys.readouterr().err
    assert main(["visualize", "curves", str(tmp_path)]) == 2
    assert "metrics.csv" in capsys.readouterr().err
    assert main(["visualize", "recon", str(run_with_pictures), "-n", "0"]) == 2
    assert "--count" in capsys.readouterr().err
