"""``hvpmtl detect``: Mask R-CNN (torchvision) on the pre-trained backbone, COCO box and mask AP.

The backbone's four pyramid maps (:func:`hvpmtl.eval.pyramid.build_pyramid`: Swin's stages
through an FPN, or ViTDet's simple feature pyramid) plus a max-pooled fifth level feed
torchvision's ``MaskRCNN``. Inputs follow ViTDet: resized so that the long side fits
``img_size`` (short side ``min_size``, drawn per batch in training) and padded to one
``img_size x img_size`` square, so ViT position embeddings never need resampling. Training is
the shared :func:`hvpmtl.eval.downstream.train_downstream` loop (AdamW, warm-up + cosine, DDP);
evaluation is pycocotools' ``COCOeval`` on boxes and masks (AP, AP50, AP75 in %).

>>> out = run_detect(load_config("cpu-maskrcnn", cls=DetectRunConfig, preset_dir=preset_dir("detect")),
...                  resolve_weights(None, random_init=True), Path("runs/det"), DistEnv())
>>> out["metrics"]  # {"box_AP": .., "box_AP50": .., "box_AP75": .., "mask_AP": .., ...}
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from hvpmtl.data.coco import CocoInstances, export_coco
from hvpmtl.data.views import SeededItems
from hvpmtl.engine.distributed import DistEnv, all_gather_object, barrier, broadcast_object
from hvpmtl.eval.config import DetectRunConfig
from hvpmtl.eval.downstream import DownstreamTask, layer_decay_groups, seed_all, train_downstream
from hvpmtl.eval.identity import run_identity
from hvpmtl.eval.pyramid import SwinStages, build_dense_backbone, build_pyramid
from hvpmtl.eval.weights import Weights

__all__ = [
    "LOSS_KEYS",
    "METRICS",
    "DetectionBackbone",
    "TrainTransform",
    "backbone_of",
    "build_mask_rcnn",
    "coco_metrics",
    "collate_detection",
    "detection_task",
    "predict_coco",
    "roi_budgets",
    "run_detect",
]

LOSS_KEYS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
METRICS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # Mask R-CNN / FPN: three anchors per location and level
ANCHOR_PER_STRIDE = 8  # FPN's anchor side 32..512 on strides 4..64
REFERENCE_SIDE = 1024  # ViTDet's input; the RoI budgets below are torchvision's defaults there


def roi_budgets(img_size: int) -> dict[str, int]:
    """Proposals and sampled RoIs per image, scaled with the input area ``(S / 1024)^2`` from
    torchvision's defaults (2000 proposals in training, 1000 in testing, 512 RoIs) down to
    floors of 300 proposals and 128 RoIs: a 64 px scene with a few objects has no use for 512
    RoIs, which would make the RoI heads 3x the cost of the rest of a CPU step."""
    area = min(1.0, (img_size / REFERENCE_SIDE) ** 2)
    train, test, rois = (max(floor, round(n * area)) for n, floor in ((2000, 300), (1000, 300), (512, 128)))
    return {
        "rpn_pre_nms_top_n_train": train, "rpn_post_nms_top_n_train": train,
        "rpn_pre_nms_top_n_test": test, "rpn_post_nms_top_n_test": test, "box_batch_size_per_image": rois,
    }  # fmt: skip


class DetectionBackbone(nn.Module):
    """The pyramid as Mask R-CNN's backbone: ``B x 3 x S x S`` -> ``OrderedDict`` of five
    ``B x C x S/s x S/s`` maps ``'0'..'3'`` (strides ``s`` of the pyramid) and ``'pool'``
    (stride ``2 s_3``, FPN's max-pooled P6 for the RPN).

    Swin's stages (channels ``C_i``) go through torchvision's ``FeaturePyramidNetwork`` to
    ``channels``; the simple pyramid (ViT) is ``channels`` wide already and only gains the pool.
    """

    def __init__(self, pyramid: nn.Module, channels: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = pyramid
        self.names = ["0", "1", "2", "3"]
        if any(c != channels for c in pyramid.out_channels):
            self.fpn, self.pool = FeaturePyramidNetwork(list(pyramid.out_channels), channels, LastLevelMaxPool()), None
        else:
            self.fpn, self.pool = None, LastLevelMaxPool()
        self.out_channels = channels
        self.strides = [*pyramid.strides, 2 * pyramid.strides[-1]]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = OrderedDict(zip(self.names, self.body(x)))
        if self.fpn is not None:
            return self.fpn(maps)
        feats, names = self.pool(list(maps.values()), list(maps.values()), list(self.names))
        return OrderedDict(zip(names, feats))


def build_mask_rcnn(weights: Weights, cfg: DetectRunConfig, num_classes: int) -> nn.Module:
    """torchvision ``MaskRCNN`` on the backbone of ``weights``; ``num_classes`` counts the
    background (categories + 1).

    Anchors: one size per level, ``8 x stride`` (torchvision's 32..512 on strides 4..64), three
    aspect ratios; proposal and RoI counts from :func:`roi_budgets`. Heads scale with
    ``fpn_channels`` ``C``: box head MLP ``4C`` wide, mask head four ``C``-channel convolutions
    (torchvision's 1024 and 256 at ``C = 256``), so a CPU-sized ``C`` shrinks the whole model.
    Input: ``S = detect.img_size or backbone.img_size``, short side ``detect.min_size or [S]``,
    long side at most ``S``, every batch padded to ``S x S`` (``size_divisible = S``);
    normalised with ``data.mean``/``data.std``.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    d = cfg.detect
    if num_classes < 2:
        raise ValueError(f"build_mask_rcnn: num_classes={num_classes} must count the background and >= 1 category")
    size = d.img_size or weights.backbone.img_size
    min_size = tuple(d.min_size) if d.min_size else (size,)
    if min(min_size) <= 0:
        raise ValueError(f"detect.min_size={list(d.min_size)}: sides must be positive")
    backbone = build_dense_backbone(weights, size, cfg.drop_path)
    pyramid = build_pyramid(backbone, d.pyramid, d.fpn_channels)
    if isinstance(pyramid, SwinStages):  # stages normed by the pyramid's own LayerNorms: Swin's final norm is unused
        backbone.model.norm.requires_grad_(False)
    body = DetectionBackbone(pyramid, d.fpn_channels)
    c, rep = d.fpn_channels, 4 * d.fpn_channels
    anchors = AnchorGenerator(
        tuple((ANCHOR_PER_STRIDE * s,) for s in body.strides), (ASPECT_RATIOS,) * len(body.strides)
    )
    model = MaskRCNN(
        body, None, min_size=min_size, max_size=size, size_divisible=size,
        image_mean=list(cfg.data.mean), image_std=list(cfg.data.std), rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(c * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, num_classes),
        mask_head=MaskRCNNHeads(c, (c,) * 4, 1), mask_predictor=MaskRCNNPredictor(c, c, num_classes),
        box_score_thresh=d.box_score_thresh, box_detections_per_img=d.detections_per_img, **roi_budgets(size),
    )  # fmt: skip
    # Every trainable parameter takes part in every training step, also for images without
    # objects (empty RoI sets still enter the graph, with zero losses): DDP needs no search.
    model.has_unused_parameters = False
    return model


def backbone_of(model: nn.Module) -> nn.Module:
    """The pre-trained ``MaskedBackbone`` inside a model from :func:`build_mask_rcnn`."""
    return model.backbone.body.backbone


def _plain(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """tv_tensors -> plain tensors (torchvision's detection models expect those)."""
    out = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
    return image.as_subclass(torch.Tensor), out


class TrainTransform:
    """``(image, target)`` -> horizontally flipped with probability ``hflip`` (image, boxes and
    masks jointly; torch's RNG, which :class:`SeededItems` seeds), as plain tensors."""

    def __init__(self, hflip: float = 0.5):
        self.flip = v2.RandomHorizontalFlip(hflip) if hflip > 0 else None

    def __call__(self, sample):
        image, target = sample
        if self.flip is not None:
            image, target = self.flip(image, target)
        return _plain(image, target)


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])`` (sizes may differ)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def _collate_eval(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    return collate_detection([_plain(*sample) for sample in batch])


def _encode(masks: torch.Tensor) -> list[dict]:
    """Bool ``N x H x W`` -> compressed RLEs with ``str`` counts."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _results(output: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's Mask R-CNN output -> COCO result dicts (``bbox`` xywh, ``segmentation``)."""
    boxes = output["boxes"].float().cpu()
    if len(boxes) == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    rles = _encode(output["masks"][:, 0].float().cpu() > 0.5)  # probabilities pasted at image size
    labels, scores = output["labels"].tolist(), output["scores"].float().tolist()
    return [
        {"image_id": image_id, "category_id": category_ids[k - 1], "bbox": b, "score": s, "segmentation": r}
        for b, k, s, r in zip(xywh, labels, scores, rles)
    ]


@torch.no_grad()
def predict_coco(
    model: nn.Module, data: CocoInstances, env: DistEnv, batch_size: int = 8, num_workers: int = 0
) -> list[dict]:
    """COCO result dicts of ``model`` (eval mode) over ``data``, rank ``r`` predicting items
    ``r::world`` and all ranks receiving every result (``all_gather_object``)."""
    part = Subset(data, range(env.rank, len(data), env.world_size))
    loader = DataLoader(part, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_eval)
    results = []
    for images, targets in loader:
        outputs = model([im.to(env.device) for im in images])  # original sizes: boxes and masks come back at them
        for out, t in zip(outputs, targets):
            results += _results(out, int(t["image_id"]), data.category_ids)
    return [r for part_results in all_gather_object(results, env) for r in part_results]


def coco_metrics(coco_gt, results: list[dict]) -> dict[str, float]:
    """pycocotools ``COCOeval`` of ``results`` (COCO result dicts with ``bbox`` and
    ``segmentation``) against ``coco_gt``: ``box_AP``, ``box_AP50``, ``box_AP75`` and the
    ``mask_`` ones, in % (``100 x stats[0:3]``); 0 without detections, NaN without ground truth."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(METRICS, 0.0)
    # COCOeval turns ground-truth polygons into RLE in place; the data set reads the same dicts
    coco_gt = copy.deepcopy(coco_gt)
    out = {}
    for iou_type, prefix, drop in (("bbox", "box", "segmentation"), ("segm", "mask", "bbox")):
        # one result set per kind (as torchvision's references): segm areas then come from the masks
        dets = [{k: v for k, v in copy.deepcopy(r).items() if k != drop} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, value in zip(("AP", "AP50", "AP75"), ev.stats[:3]):
            out[f"{prefix}_{name}"] = float(100 * value) if value >= 0 else float("nan")
    return out


def detection_task(
    weights: Weights, cfg: DetectRunConfig, train: CocoInstances, val: CocoInstances, env: DistEnv
) -> DownstreamTask:
    """Mask R-CNN on ``train`` (flip-augmented, seeded per ``(index, epoch)``), evaluated by
    :func:`coco_metrics` on ``val`` (sharded over ranks)."""
    if list(train.classes) != list(val.classes):
        raise ValueError(
            f"detect: the train and val splits have different categories ({train.classes} vs {val.classes})"
        )
    model = build_mask_rcnn(weights, cfg, len(train.classes) + 1)
    eval_batch = max(1, cfg.data.batch_size // env.world_size)

    def loss(net, batch):
        images, targets = batch
        losses = net(images, targets)
        return {"loss": sum(losses.values()), **losses}

    def evaluate(net, env):
        results = predict_coco(net, val, env, eval_batch, cfg.data.num_workers)
        metrics = coco_metrics(val.coco, results) if env.is_main else None
        return broadcast_object(metrics, env)

    return DownstreamTask(
        name="detect",
        model=model,
        train_set=SeededItems(train, TrainTransform(cfg.detect.hflip), seed=cfg.train.seed),
        collate=collate_detection,
        loss_fn=loss,
        evaluate_fn=evaluate,
        groups=layer_decay_groups(model, backbone_of(model).model, cfg.optim.weight_decay, cfg.layer_decay),
        loss_keys=LOSS_KEYS,
    )


def _export_builtin(cfg: DetectRunConfig, img_size: int, root: Path, env: DistEnv) -> None:
    """Rank 0 writes the built-in ``cfg.data`` train and val splits as the COCO splits
    ``detect.train_split`` and ``detect.val_split``; an error there is raised on every rank."""
    from hvpmtl.data import build_dataset

    error = None
    if env.is_main:
        try:
            for split, name in (("train", cfg.detect.train_split), ("val", cfg.detect.val_split)):
                export_coco(build_dataset(cfg.data, img_size, split), root, name, cfg.train.progress)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = f"{type(err).__name__}: {err}"
    error = broadcast_object(error, env)
    if error:
        raise RuntimeError(f"detect: exporting the built-in data to {root} failed: {error}")
    barrier(env)


def run_detect(cfg: DetectRunConfig, weights: Weights, run_dir: Path, env: DistEnv) -> dict:
    """Train and evaluate Mask R-CNN (module docstring) in ``run_dir``; under torchrun too.

    ``detect.root`` empty: the built-in ``cfg.data`` is exported to ``run_dir/coco-data`` first
    and read back through :class:`CocoInstances`. Evaluates every ``detect.eval_every`` epochs
    and at the end. Returns ``{"metrics", "train_images", "val_images", "steps", "seconds"}``.
    """
    start = time.perf_counter()
    seed_all(cfg.train.seed)  # the new pyramid and heads: the same in every run of this config
    run_dir = Path(run_dir)
    d = cfg.detect
    root = Path(d.root) if d.root else run_dir / "coco-data"
    if not d.root:
        _export_builtin(cfg, d.img_size or weights.backbone.img_size, root, env)
    elif not root.is_dir():
        raise FileNotFoundError(f"detect.root: folder not found: {root}")
    train, val = CocoInstances(root, d.train_split), CocoInstances(root, d.val_split)
    task = detection_task(weights, cfg, train, val, env)
    result = train_downstream(task, cfg, env, run_dir, cfg.data.batch_size, cfg.data.num_workers, d.eval_every,
                              identity=run_identity("detect", cfg, weights))  # fmt: skip
    return {"metrics": result.metrics, "train_images": len(train), "val_images": len(val), "steps": result.steps,
            "seconds": time.perf_counter() - start}  # fmt: skip
