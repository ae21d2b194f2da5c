"""Weighted k-nearest-neighbour classification on frozen features (DINO, Caron et al. 2021).

Features are L2-normalised; each query's ``k`` most cosine-similar training images vote with
weight ``exp(s / T)`` for their labels. Single-label: the class with the largest summed vote
(top-1 / top-5, as DINO reports). Multi-label: the weighted fraction of neighbours carrying each
label is its score (mAP and the threshold metrics of :mod:`hvpmtl.eval.metrics`).

>>> scores = knn_scores(train_x, train_y, test_x, k=20, temperature=0.07)   # N_test x C
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hvpmtl.eval.metrics import is_single_label, multilabel_metrics, topk_accuracy


@torch.no_grad()
def knn_scores(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 20, temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:  # fmt: skip
    """``N_test x C`` vote fractions: ``sum_j w_j y_j / sum_j w_j`` over the ``k`` nearest
    training images ``j`` (cosine similarity ``s_j``, ``w_j = exp(s_j / T)``).

    ``train_y`` is ``N_train x C`` (one-hot or multi-hot); runs on ``train_x``'s device in query
    chunks of ``chunk`` rows.
    """
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test image")
    k = min(k, train_x.shape[0])
    bank = F.normalize(train_x.float(), dim=1)
    labels = train_y.float().to(bank.device)
    out = []
    for q in F.normalize(test_x.float().to(bank.device), dim=1).split(chunk):
        sims, idx = (q @ bank.T).topk(k, dim=1)
        w = ((sims - sims[:, :1]) / temperature).exp()  # shifted by the row max: same ratios, no overflow
        votes = torch.einsum("nk,nkc->nc", w, labels[idx])
        out.append((votes / w.sum(1, keepdim=True)).cpu())
    return torch.cat(out)


def knn_evaluate(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 20,
    temperature: float = 0.07, single_label: bool | None = None,
) -> dict[str, float]:  # fmt: skip
    """k-NN metrics in %: ``top1``/``top5`` for single-label data, else ``mAP`` and CP..OF1
    (``single_label=None``: single-label when every image has exactly one label)."""
    scores = knn_scores(train_x, train_y, test_x, k, temperature)
    if single_label if single_label is not None else is_single_label(train_y, test_y):
        return topk_accuracy(scores, test_y)
    return multilabel_metrics(scores, test_y)
