"""k-NN monitoring during pre-training (``eval.knn_every=N``), as self-supervised libraries do.

Every ``N`` steps (and at the last step) the student's and the teacher's backbones embed a fixed
subset of the data (the first ``eval.knn_train_images`` train images, clean labels, as the bank;
the first ``eval.knn_val_images`` val images as queries) and the weighted k-NN classifier of
:mod:`hvpmtl.eval.knn` scores them. The numbers are those of ``hvpmtl knn`` on the checkpoint of
that step with the same subset (``train_images`` / ``eval_images``), k, temperature and feature.
The global RNG is left untouched, so monitoring does not change the training run.
"""

from __future__ import annotations

import torch

from hvpmtl.data import build_dataset
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.eval.features import extract_features
from hvpmtl.eval.finetune import is_multi_label
from hvpmtl.eval.frozen import eval_images
from hvpmtl.eval.knn import knn_evaluate


class KNNMonitor:
    """Callable on the unwrapped ``HVPMTL``; returns ``{"knn_<metric>": .., "knn_teacher_<metric>": ..}``."""

    def __init__(self, cfg, env: DistEnv, teacher: bool = True):
        m, size = cfg.eval, cfg.backbone.img_size
        self.cfg, self.env = m, env
        self.train = eval_images(cfg.data, size, "train", m.knn_train_images)
        self.val = eval_images(cfg.data, size, "val", m.knn_val_images)
        self.precision = "bf16" if cfg.train.precision == "bf16" else "fp32"
        multi = is_multi_label(build_dataset(cfg.data, size, "train"))
        self.metrics = ("mAP",) if multi else ("top1", "top5")
        self.keys = tuple(f"knn_{who}{k}" for who in ("", "teacher_")[: 1 + teacher] for k in self.metrics)

    @torch.no_grad()
    def __call__(self, model, sharded: bool = True) -> dict[str, float]:
        """``sharded=False`` (FSDP, whose forward is collective) has every process embed every image."""
        out = {}
        env = self.env if sharded else None
        nets = [("", model.backbone)] + ([("teacher_", model.teacher["backbone"])] if model.teacher is not None else [])
        with torch.random.fork_rng(devices=[self.env.device] if self.env.device.type == "cuda" else []):
            for who, backbone in nets:
                (xtr, ytr), (xva, yva) = (
                    extract_features(backbone, ds, self.cfg.knn_feature, 256, 0, self.env.device, self.precision, env)
                    for ds in (self.train, self.val)
                )
                r = knn_evaluate(xtr, ytr, xva, yva, self.cfg.knn_k, self.cfg.knn_temperature, self.metrics != ("mAP",))
                out.update({f"knn_{who}{k}": r[k] for k in self.metrics})
        return out
