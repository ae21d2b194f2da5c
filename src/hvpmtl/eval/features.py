"""Frozen features of a backbone over a data set, computed once for k-NN and linear probes.

Feature kinds: ``mean`` (average of the last feature map: every patch token), ``pooled`` (the
backbone's own pooling: ViT's class token, Swin's average pool), ``both`` (concatenated),
``grid`` (``both`` plus the feature map averaged over a 2 x 2 grid of cells, flattened: where on
the image a pattern sits, as in the spatially pooled linear evaluations of self-supervised
convolutional networks; 6 d numbers) and ``pixels`` (the normalised input image, flattened: the
raw-pixel baseline). Under torchrun each process extracts a contiguous shard of the data set
and every process receives all features.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hvpmtl.engine.distributed import DistEnv, all_gather_object
from hvpmtl.eval.config import FEATURES as KINDS

GRID_CELLS = 2  # the grid feature's cells per side (4 x 4 scored no higher on Fashion-MNIST items)


def backbone_features(backbone: nn.Module | None, images: torch.Tensor, kind: str) -> torch.Tensor:
    """``B x d`` float features of a batch of normalised ``images`` (see the module docstring)."""
    if kind == "pixels":
        return images.float().flatten(1)
    fmap, pooled = backbone(images, None)
    mean = fmap.float().mean(dim=(2, 3))
    if kind == "mean":
        return mean
    if kind == "pooled":
        return pooled.float()
    if kind == "both":
        return torch.cat([pooled.float(), mean], 1)
    if kind == "grid":
        cells = F.adaptive_avg_pool2d(fmap.float(), GRID_CELLS).flatten(1)
        return torch.cat([pooled.float(), mean, cells], 1)
    raise ValueError(f"feature: expected one of {', '.join(KINDS)}, got '{kind}'")


def _shard(n: int, env: DistEnv | None) -> range:
    if env is None or not env.distributed:
        return range(n)
    per = -(-n // env.world_size)
    return range(min(env.rank * per, n), min((env.rank + 1) * per, n))


@torch.no_grad()
def extract_features(
    backbone: nn.Module | None, dataset: Dataset, kind: str = "mean", batch_size: int = 256, num_workers: int = 0,
    device: str | torch.device = "cpu", precision: str = "fp32", env: DistEnv | None = None,
    progress: bool = False, desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(N x d features, N x C labels)`` on CPU for a data set of ``(image, labels)`` pairs, in
    data-set order. ``precision="bf16"`` runs the backbone under bf16 autocast (features are
    returned in fp32). Collective under torchrun when ``env`` is given."""
    if kind not in KINDS:
        raise ValueError(f"feature: expected one of {', '.join(KINDS)}, got '{kind}'")
    device = torch.device(device)
    was_training = backbone.training if backbone is not None else False
    if backbone is not None:
        backbone.eval().to(device)
    part = _shard(len(dataset), env)
    loader = DataLoader(Subset(dataset, part), batch_size=batch_size, num_workers=num_workers)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" and kind != "pixels"
           else contextlib.nullcontext())  # fmt: skip
    feats, labels = [], []
    from tqdm.auto import tqdm

    show = progress and (env is None or env.is_main)
    for images, y in tqdm(loader, desc=desc, disable=not show, leave=False, unit="batch"):
        with amp:
            f = backbone_features(backbone, images.to(device, non_blocking=True), kind)
        feats.append(f.float().cpu())
        labels.append(y.float())
    if backbone is not None:
        backbone.train(was_training)
    x = torch.cat(feats) if feats else torch.zeros(0, 0)
    y = torch.cat(labels) if labels else torch.zeros(0, 0)
    if env is not None and env.distributed:
        parts = all_gather_object((x, y), env)
        x = torch.cat([p[0] for p in parts if p[0].numel()])
        y = torch.cat([p[1] for p in parts if p[1].numel()])
    return x, y
