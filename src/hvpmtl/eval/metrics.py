"""Classification metrics, computed by torchmetrics, reported in %.

* Single-label: top-1 / top-5 accuracy.
* Multi-label (as Query2Label and ASL report them, after ML-GCN): mAP (macro over classes with a
  positive), and at a score threshold: CP/CR (per-class precision/recall averaged over classes),
  CF1 = 2 CP CR / (CP + CR), OP/OR (over all labels), OF1 = 2 OP OR / (OP + OR); the same six
  with each image's top-3 scores as its predicted labels (``*_top3``).
"""

from __future__ import annotations

import torch


def is_single_label(*label_sets: torch.Tensor) -> bool:
    """True when every row of every ``N x C`` label matrix has exactly one positive."""
    return all(bool((y.sum(1) == 1).all()) for y in label_sets)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``{"top1": .., "top5": ..}`` in % for ``N x C`` scores and ``N`` class indices (or one-hot
    ``N x C``); ``k`` larger than ``C`` is left out."""
    from torchmetrics.functional.classification import multiclass_accuracy

    if targets.ndim == 2:
        targets = targets.argmax(1)
    C = scores.shape[1]
    return {
        f"top{k}": 100.0 * float(multiclass_accuracy(scores.float(), targets.long(), C, top_k=k, average="micro"))
        for k in ks
        if k <= C
    }


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro mAP in % over the classes that have at least one positive."""
    from torchmetrics.classification import MultilabelAveragePrecision

    keep = labels.sum(0) > 0
    metric = MultilabelAveragePrecision(num_labels=int(keep.sum()), average="macro")
    return 100.0 * float(metric(scores[:, keep].float(), labels[:, keep].long()))


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _prf(pred: torch.Tensor, labels: torch.Tensor, suffix: str) -> dict[str, float]:
    from torchmetrics.functional.classification import multilabel_precision, multilabel_recall

    C = labels.shape[1]
    p, y = pred.long(), labels.long()
    cp = 100.0 * float(multilabel_precision(p, y, C, average="macro", zero_division=0))
    cr = 100.0 * float(multilabel_recall(p, y, C, average="macro", zero_division=0))
    op = 100.0 * float(multilabel_precision(p, y, C, average="micro", zero_division=0))
    orr = 100.0 * float(multilabel_recall(p, y, C, average="micro", zero_division=0))
    return {f"CP{suffix}": cp, f"CR{suffix}": cr, f"CF1{suffix}": _f1(cp, cr),
            f"OP{suffix}": op, f"OR{suffix}": orr, f"OF1{suffix}": _f1(op, orr)}  # fmt: skip


def multilabel_metrics(
    scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5, top_k: int = 3
) -> dict[str, float]:
    """mAP and CP/CR/CF1/OP/OR/OF1 (module docstring) for ``N x C`` scores and multi-hot labels.

    ``scores`` are probabilities (``sigmoid(logits)``, k-NN vote fractions); a label is
    predicted when its score is ``>= threshold``, or, for the ``_top3`` variants, when it is
    among the image's ``top_k`` scores.
    """
    scores, labels = scores.float(), labels.float()
    out = {"mAP": mean_average_precision(scores, labels)}
    out.update(_prf(scores >= threshold, labels, ""))
    k = min(top_k, scores.shape[1])
    top = torch.zeros_like(labels).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    out.update(_prf(top > 0, labels, f"_top{top_k}"))
    return out
