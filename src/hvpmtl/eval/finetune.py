"""``hvpmtl finetune``: full fine-tuning with the SimMIM / BEiT recipe (SimMIM Sec. 4.1).

The pre-trained backbone becomes a timm classifier (mean pooling of the final tokens by
default, as SimMIM fine-tunes ViT, plus a new linear head) trained end to end with layer-wise lr
decay (timm's ``param_groups_layer_decay``), drop path, timm's RandAugment
(``rand-m9-mstd0.5-inc1``) and random erasing, timm's Mixup/CutMix with label smoothing, AdamW
with linear warm-up and cosine decay, and optionally an EMA of the weights (timm ``ModelEmaV3``).
Multi-label data trains with binary cross-entropy on (mixed) multi-hot targets and reports mAP.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hvpmtl.data import EvalImages, EvalTransform, FashionMNISTItems, ImageFiles, SeededItems, build_dataset
from hvpmtl.engine.distributed import DistEnv, all_gather_object
from hvpmtl.eval.config import FinetuneRunConfig
from hvpmtl.eval.downstream import DownstreamTask, layer_decay_groups, seed_all, train_downstream
from hvpmtl.eval.identity import run_identity
from hvpmtl.eval.metrics import multilabel_metrics, topk_accuracy
from hvpmtl.eval.weights import Weights, load_into


def is_multi_label(dataset: Dataset, setting: str = "auto") -> bool:
    """Whether ``dataset`` has several tags per image; ``auto`` decides without reading images
    (single items and ImageFolder: no; manifests: whether any line lists more or fewer than one
    tag; the built-in scenes and mosaics: yes)."""
    if setting != "auto":
        return setting == "true"
    if isinstance(dataset, FashionMNISTItems):
        return False
    if isinstance(dataset, ImageFiles):
        return any(len(t) != 1 for t in dataset.targets)
    return True


def build_classifier(weights: Weights, num_classes: int, cfg: FinetuneRunConfig) -> nn.Module:
    """A timm classifier with the backbone of ``weights`` and a new ``num_classes`` head."""
    b = weights.backbone
    kwargs = dict(b.kwargs, img_size=b.img_size, num_classes=num_classes, drop_path_rate=cfg.finetune.drop_path)
    if b.patch_size is not None:
        kwargs["patch_size"] = b.patch_size
    if b.window_size is not None:
        kwargs["window_size"] = b.window_size
    if "swin" not in b.name:
        # avg: mean of the final normed patch tokens (SimMIM's ViT fine-tuning); fc_norm off keeps
        # timm's final norm, whose weights were pre-trained
        kwargs.update(global_pool=cfg.finetune.global_pool, fc_norm=False)
    elif cfg.finetune.global_pool != "avg":
        raise ValueError("finetune.global_pool: Swin has no class token; use avg")
    if weights.state is None:
        torch.manual_seed(weights.seed)
    model = timm.create_model(b.name, pretrained=False, **kwargs)
    if weights.state is not None:
        load_into(model, weights.state, weights.label, allow_missing=("head.",))
    return model


def _train_transform(cfg: FinetuneRunConfig, img_size: int):
    """timm's ImageNet training pipeline (what ``timm.data.create_transform`` builds): random
    resized crop (bicubic), flip, RandAugment (colour jitter when RandAugment is off), normalise,
    random erasing. RandAugment's magnitude is clipped just below its maximum of 10: with
    ``mstd`` noise, timm's increasing posterize reaches 0 bits at 10, which Pillow rejects."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
    from torchvision import transforms as T
    from torchvision.transforms.v2.functional import to_pil_image

    f, d = cfg.finetune, cfg.data
    steps = [RandomResizedCropAndInterpolation(img_size, scale=tuple(f.crop_scale), interpolation="bicubic"),
             T.RandomHorizontalFlip()]  # fmt: skip
    if f.auto_augment:
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in d.mean),
                   "interpolation": str_to_pil_interp("bicubic"), "magnitude_max": 9.99}  # fmt: skip
        steps.append(rand_augment_transform(f.auto_augment, hparams))
    elif f.color_jitter > 0:
        steps.append(T.ColorJitter(*(f.color_jitter,) * 3))
    steps += [T.ToTensor(), T.Normalize(d.mean, d.std)]
    if f.reprob > 0:
        steps.append(RandomErasing(f.reprob, mode="pixel", device="cpu"))
    tf = T.Compose(steps)
    return lambda sample: (tf(to_pil_image(sample["image"])), sample["labels"].float())


def finetune_task(cfg: FinetuneRunConfig, weights: Weights, env: DistEnv) -> tuple[DownstreamTask, dict]:
    """The :class:`DownstreamTask` of fine-tuning, and facts about the data."""
    size = weights.backbone.img_size
    train_base = build_dataset(cfg.data, size, "train")
    test_base = build_dataset(replace(cfg.data, label_noise=0.0), size, cfg.eval_split)
    multi = is_multi_label(train_base, cfg.finetune.multi_label)
    classes = len(train_base.classes)
    # the first train_images / eval_images images, as knn and linprobe take them (0: all)
    if 0 < cfg.train_images < len(train_base):
        train_base = Subset(train_base, range(cfg.train_images))
    if 0 < cfg.eval_images < len(test_base):
        test_base = Subset(test_base, range(cfg.eval_images))
    model = build_classifier(weights, classes, cfg)
    model.has_unused_parameters = False
    f = cfg.finetune
    mixup = None
    if f.mixup > 0 or f.cutmix > 0:
        from timm.data import Mixup

        smoothing = 0.0 if multi else f.label_smoothing
        mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                      label_smoothing=smoothing, num_classes=classes, multi_label=multi)  # fmt: skip

    def loss(net, batch):
        x, y = batch
        if mixup is not None:
            x, y = mixup(x, y if multi else y.argmax(1))
        logits = net(x).float()
        if multi:
            return {"loss": F.binary_cross_entropy_with_logits(logits, y)}
        if mixup is not None:
            return {"loss": torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()}
        return {"loss": F.cross_entropy(logits, y.argmax(1), label_smoothing=f.label_smoothing)}

    test_set = EvalImages(test_base, EvalTransform(size, cfg.data.eval_crop_pct, cfg.data.mean, cfg.data.std))

    def evaluate(net, env_):
        per = -(-len(test_set) // env_.world_size)
        shard = Subset(test_set, range(min(env_.rank * per, len(test_set)), min((env_.rank + 1) * per, len(test_set))))
        logits, labels = [], []
        for x, y in DataLoader(shard, batch_size=256, num_workers=cfg.data.num_workers):
            logits.append(net(x.to(env_.device)).float().cpu())
            labels.append(y)
        parts = all_gather_object((torch.cat(logits) if logits else None, torch.cat(labels) if labels else None), env_)
        z = torch.cat([p[0] for p in parts if p[0] is not None])
        y = torch.cat([p[1] for p in parts if p[1] is not None])
        return multilabel_metrics(z.sigmoid(), y) if multi else topk_accuracy(z, y)

    groups = layer_decay_groups(model, model, cfg.optim.weight_decay, f.layer_decay)
    task = DownstreamTask(
        name="finetune", model=model, train_set=SeededItems(train_base, _train_transform(cfg, size), cfg.train.seed),
        collate=lambda items: (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])),
        loss_fn=loss, evaluate_fn=evaluate, groups=groups,
    )  # fmt: skip
    facts = {"train_images": len(train_base), "eval_images": len(test_base), "classes": classes, "multi_label": multi}
    return task, facts


def run_finetune(cfg: FinetuneRunConfig, weights: Weights, run_dir: Path, env: DistEnv) -> dict:
    """Fine-tune and evaluate; ``{"metrics", "ema_metrics", "history", ...facts, "seconds"}``."""
    t0 = time.perf_counter()
    seed_all(cfg.train.seed)  # the new head: the same in every run of this config
    task, facts = finetune_task(cfg, weights, env)
    ema = cfg.finetune.ema_decay if cfg.finetune.ema else None
    result = train_downstream(task, cfg, env, run_dir, cfg.data.batch_size, cfg.data.num_workers,
                              cfg.finetune.eval_every, ema, run_identity("finetune", cfg, weights))  # fmt: skip
    return {"metrics": result.metrics, "ema_metrics": result.ema_metrics, "history": result.history,
            "steps": result.steps, **facts, "seconds": time.perf_counter() - t0}  # fmt: skip
