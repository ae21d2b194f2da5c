"""Mask R-CNN on the pre-trained backbone: COCO metrics, model build, training, DDP."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hvpmtl.backbones import BackboneConfig
from hvpmtl.data import SyntheticScenes
from hvpmtl.data.coco import CocoInstances, export_coco
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.metrics import read_metrics
from hvpmtl.eval.config import DetectRunConfig
from hvpmtl.eval.detection import (
    LOSS_KEYS,
    METRICS,
    TrainTransform,
    build_mask_rcnn,
    coco_metrics,
    collate_detection,
    predict_coco,
    roi_budgets,
    run_detect,
)
from hvpmtl.eval.weights import Weights

TINY_VIT = BackboneConfig(
    name="vit_tiny_patch16_224", img_size=32, patch_size=8, kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}
)
TINY_SWIN = BackboneConfig(
    name="swin_tiny_patch4_window7_224", img_size=64, window_size=4,
    kwargs={"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": [1, 1, 2, 2]},
)  # fmt: skip
FIVE_LOSSES = set(LOSS_KEYS) - {"loss"}
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread; on a busy 2-core machine two OpenMP
    threads stall each other at every op (the end-to-end test: 5 s instead of ~50 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(*overrides: str) -> DetectRunConfig:
    from hvpmtl.config import load_config

    return load_config(None, ["detect.fpn_channels=32", "drop_path=0.0", "train.progress=false", *overrides],
                       cls=DetectRunConfig)  # fmt: skip


def weights(backbone: BackboneConfig) -> Weights:
    return Weights(backbone, None, "random init")


# ----------------------------------------------------------------------------------------------
# (a) metrics: pycocotools on hand-built cases


def square_gt(boxes: list[list[int]], size: int = 32) -> COCO:
    """One ``size x size`` image whose objects are the filled ``[x, y, w, h]`` squares."""
    anns = []
    for i, (x, y, w, h) in enumerate(boxes):
        m = np.zeros((size, size), dtype=np.uint8)
        m[y : y + h, x : x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "area": w * h,
                     "iscrowd": 0, "segmentation": rle})  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": size, "height": size}], "annotations": anns,
                    "categories": [{"id": 1, "name": "square"}]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def as_predictions(coco: COCO, dx: int = 0) -> list[dict]:
    """The ground truth as score-1 detections, boxes and masks shifted right by ``dx`` pixels."""
    out = []
    for ann in coco.dataset["annotations"]:
        m = np.roll(mask_utils.decode(ann["segmentation"]), dx, axis=1)
        rle = mask_utils.encode(np.asfortranarray(m))
        x, y, w, h = ann["bbox"]
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                    "bbox": [x + dx, y, w, h], "segmentation": rle})  # fmt: skip
    return out


def test_ground_truth_as_predictions_scores_100():
    coco = square_gt([[2, 3, 10, 10], [16, 14, 12, 9]])
    metrics = coco_metrics(coco, as_predictions(coco))
    assert set(metrics) == set(METRICS)
    assert all(v == pytest.approx(100.0) for v in metrics.values())


@pytest.mark.parametrize(("dx", "ap", "ap75"), [(1, 70.0, 100.0), (3, 10.0, 0.0)])
def test_shifted_predictions_score_the_fraction_of_thresholds_they_pass(dx, ap, ap75):
    # a 10x10 square shifted by dx: IoU = (10 - dx) / (10 + dx), 0.818 for 1 px (passes 0.50..0.80:
    # 7 of COCO's 10 thresholds), 0.538 for 3 px (passes 0.50 only); the same for its mask
    coco = square_gt([[10, 10, 10, 10]])
    metrics = coco_metrics(coco, as_predictions(coco, dx))
    for kind in ("box", "mask"):
        assert metrics[f"{kind}_AP"] == pytest.approx(ap)
        assert metrics[f"{kind}_AP50"] == pytest.approx(100.0)
        assert metrics[f"{kind}_AP75"] == pytest.approx(ap75)


def test_no_detections_scores_0():
    assert coco_metrics(square_gt([[1, 1, 5, 5]]), []) == dict.fromkeys(METRICS, 0.0)


def test_predictions_through_the_reader_score_100(tmp_path):
    """predict_coco's conversion (labels -> category ids, xyxy -> xywh, masks -> RLE) is exact."""
    data = CocoInstances(export_coco(SyntheticScenes(4, 32), tmp_path, "val", progress=False), "val")
    order = iter(range(len(data)))

    class Oracle(torch.nn.Module):
        def forward(self, images):
            outs = []
            for _ in images:
                _, t = data[next(order)]
                outs.append({"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"],
                             "scores": torch.ones(len(t["labels"])), "masks": t["masks"][:, None].float()})  # fmt: skip
            return outs

    results = predict_coco(Oracle(), data, DistEnv(), batch_size=3)
    assert len(results) == len(data.coco.dataset["annotations"])
    assert all(v == pytest.approx(100.0) for v in coco_metrics(data.coco, results).values())


def polygon_coco(root: Path, split: str, n: int = 4) -> CocoInstances:
    """``n`` 64 x 64 images with one polygon-annotated square each (real COCO stores most masks so)."""
    from PIL import Image

    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(root / split / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns.append({"id": i + 1, "image_id": i, "category_id": 1 + i % 2, "bbox": [5, 5, 20, 20], "area": 400,
                     "iscrowd": 0, "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]]})  # fmt: skip
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return CocoInstances(root, split)


def test_polygon_ground_truth_survives_repeated_evaluations(tmp_path):
    """COCOeval rewrites ground-truth polygons as RLE in place: the data set must not see that
    (the second evaluation of a run used to fail reading its own val images)."""
    data = polygon_coco(tmp_path, "val")

    class Oracle(torch.nn.Module):
        def forward(self, images):
            outs = []
            for _ in images:
                _, t = data[len(outs) + self.seen]
                outs.append({"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"],
                             "scores": torch.ones(len(t["labels"])), "masks": t["masks"][:, None].float()})  # fmt: skip
            self.seen += len(images)
            return outs

    scores = []
    for _ in range(2):
        oracle = Oracle()
        oracle.seen = 0
        scores.append(coco_metrics(data.coco, predict_coco(oracle, data, DistEnv(), batch_size=4)))
    assert scores[0] == scores[1] and scores[0]["mask_AP"] > 0
    assert isinstance(data.coco.dataset["annotations"][0]["segmentation"], list)  # still the polygon


# ----------------------------------------------------------------------------------------------
# (b)-(d) the model


@pytest.fixture(scope="module")
def vit_data(tmp_path_factory) -> CocoInstances:
    root = export_coco(SyntheticScenes(8, 32), tmp_path_factory.mktemp("coco"), "train", progress=False)
    return CocoInstances(root, "train")


def batch(data: CocoInstances, indices) -> tuple[list, list]:
    return collate_detection([TrainTransform(0.5)(data[i]) for i in indices])


@pytest.mark.parametrize(
    ("backbone", "strides"), [(TINY_VIT, [2, 4, 8, 16, 32]), (TINY_SWIN, [4, 8, 16, 32, 64])], ids=["vit", "swin"]
)
def test_pyramid_levels_match_the_anchors(backbone, strides):
    model = build_mask_rcnn(weights(backbone), tiny_cfg(), num_classes=11)
    S = backbone.img_size
    feats = model.backbone(torch.zeros(2, 3, S, S))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert model.backbone.strides == strides  # ViT patch 8: ViTDet's p/4..2p, then the pool; Swin: its stages
    assert [f.shape[-1] for f in feats.values()] == [S // s for s in strides]
    assert all(f.shape[1] == model.backbone.out_channels == 32 for f in feats.values())
    gen = model.rpn.anchor_generator
    assert [a[0] for a in gen.sizes] == [8 * s for s in strides]
    assert gen.num_anchors_per_location() == [3] * 5 == [model.rpn.head.cls_logits.out_channels] * 5
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert (model.backbone.fpn is not None) == (backbone is TINY_SWIN)  # Swin's stages need an FPN


@pytest.mark.parametrize("backbone", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_train_forward_gives_the_five_losses_and_every_parameter_a_gradient(backbone, tmp_path):
    data = CocoInstances(export_coco(SyntheticScenes(2, backbone.img_size), tmp_path, "t", progress=False), "t")
    model = build_mask_rcnn(weights(backbone), tiny_cfg(), num_classes=11).train()
    losses = model(*batch(data, [0, 1]))
    assert set(losses) == FIVE_LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and model.has_unused_parameters is False  # DDP needs no unused-parameter search


def test_images_without_objects_train(vit_data):
    model = build_mask_rcnn(weights(TINY_VIT), tiny_cfg(), num_classes=11).train()
    images, targets = batch(vit_data, [0, 1])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 32, 32, dtype=torch.uint8), "image_id": 99}  # fmt: skip
    for chosen in ([empty, targets[1]], [empty, dict(empty)]):  # one empty image, then only empty images
        model.zero_grad()
        losses = model(images, chosen)
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_roi_budgets_are_torchvisions_at_1024_and_smaller_for_small_inputs():
    assert roi_budgets(1024) == roi_budgets(1333) == {
        "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000, "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 1000, "box_batch_size_per_image": 512,
    }  # fmt: skip
    assert roi_budgets(64)["box_batch_size_per_image"] == 128 and roi_budgets(64)["rpn_post_nms_top_n_train"] == 300
    model = build_mask_rcnn(weights(TINY_VIT), tiny_cfg(), num_classes=11)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 128 and model.rpn.post_nms_top_n() == 300


def test_eval_output_is_at_the_original_image_size():
    model = build_mask_rcnn(weights(TINY_VIT), tiny_cfg("detect.box_score_thresh=0.0"), num_classes=11).eval()
    image = torch.rand(3, 24, 40)  # not square, smaller than img_size: resized, padded, mapped back
    with torch.no_grad():
        padded, _ = model.transform([image])
        out = model([image])[0]
    assert padded.tensors.shape[-2:] == (32, 32) and padded.image_sizes == [(19, 32)]  # long side 40 -> 32
    assert out["masks"].shape[-2:] == (24, 40) and len(out["boxes"]) > 0
    assert float(out["boxes"][:, 2].max()) <= 40 and float(out["boxes"][:, 3].max()) <= 24


@pytest.mark.slow
def test_run_detect_loss_falls_and_reports_coco_metrics(tmp_path):
    cfg = tiny_cfg(
        "data.train_size=32", "data.val_size=8", "data.batch_size=4", "data.num_workers=0",
        "optim.lr=1e-3", "optim.warmup_steps=2", "train.epochs=2", "train.log_every=4",
    )  # fmt: skip
    out = run_detect(cfg, weights(TINY_VIT), tmp_path, DistEnv())
    assert (out["train_images"], out["val_images"]) == (32, 8)
    assert set(out["metrics"]) == set(METRICS) and all(0 <= v <= 100 for v in out["metrics"].values())
    rows = read_metrics(tmp_path / "metrics.csv")
    assert len(rows) == 16 and set(LOSS_KEYS) <= set(rows[0])
    first, last = (float(np.mean([r["loss"] for r in part])) for part in (rows[:4], rows[-4:]))
    assert last < 0.8 * first, (first, last)
    source = json.loads((tmp_path / "coco-data" / "annotations" / "instances_train.json").read_text())["info"]
    assert source["source"]["size"] == 32 and source["source"]["img_size"] == 32


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from hvpmtl.backbones import BackboneConfig
from hvpmtl.config import load_config
from hvpmtl.engine.distributed import cleanup_distributed, init_distributed
from hvpmtl.eval.config import DetectRunConfig
from hvpmtl.eval.detection import run_detect
from hvpmtl.eval.weights import Weights

env = init_distributed("cpu")
cfg = load_config(None, sys.argv[2:], cls=DetectRunConfig)
backbone = BackboneConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                          kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
out = run_detect(cfg, Weights(backbone, None, "random init"), Path(sys.argv[1]), env)
Path(sys.argv[1], f"out{env.rank}.json").write_text(json.dumps(out["metrics"]))
cleanup_distributed()
"""


@pytest.mark.slow
def test_two_processes_train_and_agree_on_the_metrics(tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP without the unused-parameter search, the val set
    sharded over the ranks and gathered, the same metrics on both."""
    script = tmp_path / "ddp_detect.py"
    script.write_text(DDP_SCRIPT)
    args = [
        "detect.fpn_channels=32", "drop_path=0.0", "train.progress=false", "data.train_size=16", "data.val_size=7",
        "data.batch_size=4", "data.num_workers=0", "train.max_steps=3", "optim.warmup_steps=1",
    ]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
        f"--master_port={port}", str(script), str(tmp_path / "run"), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m0, m1 = (json.loads((tmp_path / "run" / f"out{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1 and set(m0) == set(METRICS)
    assert len(read_metrics(tmp_path / "run" / "metrics.csv")) == 3


def test_run_from_pretrained_weights_repeats_exactly(tmp_path):
    """The new pyramid and Mask R-CNN heads are seeded by train.seed, whatever the process's RNGs
    were before (each fresh process starts elsewhere)."""
    from hvpmtl.backbones import build_backbone

    torch.manual_seed(7)
    pretrained = Weights(TINY_VIT, build_backbone(TINY_VIT).model.state_dict(), "pretrained")
    cfg = tiny_cfg("data.train_size=4", "data.val_size=2", "data.batch_size=4", "data.num_workers=0",
                   "train.max_steps=1", "train.log_every=1")  # fmt: skip
    losses = []
    for i in range(2):
        torch.manual_seed(100 + i)
        np.random.seed(100 + i)
        run_detect(cfg, pretrained, tmp_path / f"run{i}", DistEnv())
        losses.append(read_metrics(tmp_path / f"run{i}" / "metrics.csv")[0]["loss"])
    assert losses[0] == losses[1]
