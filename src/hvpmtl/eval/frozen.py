"""``hvpmtl knn`` and ``hvpmtl linprobe``: frozen-feature evaluation of a backbone.

Both read the train split (k-NN bank / probe training set) and the evaluation split (queries /
test set) of any data source the pre-training reads, through the deterministic evaluation
transform (resize, centre crop, normalise) at the backbone's input size, extract features once
(sharded over processes under torchrun), and compute the metrics on rank 0.
"""

from __future__ import annotations

import time
from dataclasses import replace

from torch.utils.data import Dataset, Subset

from hvpmtl.config import ConfigError
from hvpmtl.data import EvalImages, EvalTransform, build_dataset
from hvpmtl.data.config import DataConfig
from hvpmtl.engine.distributed import DistEnv, broadcast_object
from hvpmtl.eval.config import FeatureEvalConfig
from hvpmtl.eval.features import extract_features
from hvpmtl.eval.weights import Weights, build_masked_backbone


def eval_images(data: DataConfig, img_size: int, split: str, limit: int = 0) -> Dataset:
    """``(image, labels)`` pairs of ``split`` through the evaluation transform; the first
    ``limit`` images when ``limit`` > 0. Labels are the clean ones (no ``label_noise``)."""
    base = build_dataset(replace(data, label_noise=0.0), img_size, split)
    if limit and limit < len(base):
        base = Subset(base, range(limit))
    return EvalImages(base, EvalTransform(img_size, data.eval_crop_pct, data.mean, data.std))


def _check_classes(train: Dataset, data: DataConfig) -> None:
    """k-NN votes and probe scores rank classes against each other: one class is a usage error."""
    base = getattr(train, "base", None)
    base = base.dataset if isinstance(base, Subset) else base  # train_images=N: the first N of the split
    classes = list(getattr(train, "classes", None) or getattr(base, "classes", None) or [])
    if 0 < len(classes) < 2:
        from hvpmtl.eval.report import data_label

        raise ConfigError(
            f"{data_label(data)}: the train split has 1 class ({classes[0]!r}); "
            "knn and linprobe need at least 2 classes"
        )


def frozen_features(cfg: FeatureEvalConfig, weights: Weights, env: DistEnv, kind: str) -> dict:
    """Features and labels of both splits: ``{"train": (x, y), "test": (x, y), "seconds": s}``."""
    size = weights.backbone.img_size
    train = eval_images(cfg.data, size, "train", cfg.train_images)
    test = eval_images(cfg.data, size, cfg.eval_split, cfg.eval_images)
    _check_classes(train, cfg.data)  # before the (long) feature extraction
    backbone = None if kind == "pixels" else build_masked_backbone(weights)
    r = cfg.run
    t0 = time.perf_counter()
    out = {}
    for name, ds in (("train", train), ("test", test)):
        out[name] = extract_features(backbone, ds, kind, r.batch_size, r.num_workers, env.device, r.precision, env,
                                     progress=r.progress, desc=f"{name} features")  # fmt: skip
    out["seconds"] = time.perf_counter() - t0
    return out


def run_knn(cfg: FeatureEvalConfig, weights: Weights, env: DistEnv) -> dict:
    """k-NN metrics (``hvpmtl.eval.knn``) plus sizes and timing; the same on every rank."""
    from hvpmtl.eval.knn import knn_evaluate

    f = frozen_features(cfg, weights, env, cfg.knn.feature)
    (xtr, ytr), (xte, yte) = f["train"], f["test"]
    k = min(cfg.knn.k, len(xtr))  # what knn_scores uses: results report this k, not the one asked for
    metrics = None
    if env.is_main:
        if k < cfg.knn.k:
            print(f"warning: knn.k={cfg.knn.k} is larger than the bank ({len(xtr)} images): {k} neighbours vote")
        metrics = knn_evaluate(xtr.to(env.device), ytr, xte, yte, k, cfg.knn.temperature)
    metrics = broadcast_object(metrics, env)
    return {"metrics": metrics, "k": k, "train_images": len(xtr), "eval_images": len(xte),
            "feature_dim": xtr.shape[1], "seconds": f["seconds"]}  # fmt: skip


def run_linprobe(cfg: FeatureEvalConfig, weights: Weights, env: DistEnv) -> dict:
    """Linear-probe metrics (``hvpmtl.eval.linear_probe``) plus the chosen lr / weight decay."""
    from hvpmtl.eval.linear_probe import probe

    f = frozen_features(cfg, weights, env, cfg.probe.feature)
    (xtr, ytr), (xte, yte) = f["train"], f["test"]
    result = None
    if env.is_main:
        t0 = time.perf_counter()
        dev = env.device
        result = probe(xtr.to(dev), ytr.to(dev), xte.to(dev), yte.to(dev), cfg.probe, cfg.run.seed)
        result["fit_seconds"] = time.perf_counter() - t0
    result = broadcast_object(result, env)
    chosen = {k: result.pop(k) for k in ("lr", "weight_decay", "holdout_score", "train_score", "fit_seconds")}
    return {"metrics": result, "chosen": chosen, "train_images": len(xtr), "eval_images": len(xte),
            "feature_dim": xtr.shape[1], "seconds": f["seconds"]}  # fmt: skip
