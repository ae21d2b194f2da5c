"""Multi-label linear probe: a linear layer on frozen backbone features, scored by mAP.

Features of a frozen backbone (its pooled output, or the mean of its last feature map) are
extracted once for train and val images, standardised with the train statistics, and a linear
layer is trained on them with binary cross-entropy (full batch, AdamW). The score is the macro
mean average precision over classes on the val images (torchmetrics' ``MultilabelAveragePrecision``),
the usual multi-label metric (Query2Label, ASL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class ProbeResult:
    """Val mAP (macro, in %) and train mAP of the fitted probe."""

    val_map: float
    train_map: float
    feature_dim: int


@torch.no_grad()
def extract_features(
    backbone: nn.Module, dataset: Dataset, feature: str = "pooled", batch_size: int = 128, num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(N x d features, N x C labels)`` for a data set of ``(image, labels)`` pairs.

    ``feature``: ``pooled`` (the backbone's own pooling, e.g. ViT's class token) or ``mean``
    (average of the last-stage feature map), or ``both`` (concatenated).
    """
    if feature not in ("pooled", "mean", "both"):
        raise ValueError(f"feature: expected 'pooled', 'mean' or 'both', got '{feature}'")
    was_training = backbone.training
    backbone.eval().to(device)
    feats, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        fmap, pooled = backbone(images.to(device), None)
        mean = fmap.float().mean(dim=(2, 3))
        f = {"pooled": pooled.float(), "mean": mean, "both": torch.cat([pooled.float(), mean], 1)}[feature]
        feats.append(f.cpu())
        labels.append(y.float())
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro mAP in % over the classes that have at least one positive."""
    from torchmetrics.classification import MultilabelAveragePrecision

    keep = labels.sum(0) > 0
    metric = MultilabelAveragePrecision(num_labels=int(keep.sum()), average="macro")
    return 100.0 * float(metric(scores[:, keep].float(), labels[:, keep].long()))


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0
) -> nn.Linear:
    """Full-batch AdamW on BCE-with-logits; ``x`` should be standardised."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(layer(x), y).backward()
        opt.step()
    return layer


def linear_probe(
    backbone: nn.Module, train: Dataset, val: Dataset, feature: str = "pooled", epochs: int = 300,
    lr: float = 1e-2, weight_decay: float = 1e-4, device: str | torch.device = "cpu",
) -> ProbeResult:  # fmt: skip
    """Fit a linear multi-label classifier on frozen features of ``train``; mAP on ``val``."""
    xtr, ytr = extract_features(backbone, train, feature, device=device)
    xva, yva = extract_features(backbone, val, feature, device=device)
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    layer = fit_linear(xtr, ytr, epochs, lr, weight_decay)
    with torch.no_grad():
        return ProbeResult(
            val_map=mean_average_precision(layer(xva), yva),
            train_map=mean_average_precision(layer(xtr), ytr),
            feature_dim=xtr.shape[1],
        )
