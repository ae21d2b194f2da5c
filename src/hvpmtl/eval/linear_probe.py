"""Linear probe: a linear classifier on frozen, standardised features.

Logistic regression: cross-entropy (single-label) or binary cross-entropy (multi-label) plus an
L2 penalty ``wd / 2 ||W||^2``, minimised full-batch by L-BFGS with a strong-Wolfe line search
(``probe.optimizer=lbfgs``, the default: the line search sets the step, so only the penalty is
swept) or by AdamW with a cosine learning rate (``adamw``: learning rate x weight decay swept).
Each setting is scored on a seeded held-out fraction of the **train** split; the best is
refitted on the whole train split and scored once on the evaluation split, which never takes
part in the choice.

>>> result = probe(train_x, train_y, test_x, test_y, ProbeConfig())   # {"top1": .., "lr": .., ...}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hvpmtl.eval.config import ProbeConfig
from hvpmtl.eval.metrics import is_single_label, mean_average_precision, multilabel_metrics, topk_accuracy

__all__ = ["fit_linear", "mean_average_precision", "probe", "standardize"]


def standardize(fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per feature with ``fit``'s statistics, applied to all."""
    mu, sd = fit.mean(0), fit.std(0).clamp(min=1e-6)
    return [(x - mu) / sd for x in (fit, *others)]


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, single_label: bool, epochs: int = 100, lr: float = 1.0,
    weight_decay: float = 1e-4, optimizer: str = "lbfgs",
) -> nn.Linear:  # fmt: skip
    """A linear layer minimising CE (targets = the argmax of ``y``) or BCE-with-logits plus
    ``weight_decay / 2 ||W||^2``, from zero weights (the problem is convex, so the fit is
    deterministic): ``epochs`` L-BFGS iterations, or ``epochs`` full-batch AdamW steps at ``lr``
    cosine-decayed to 0 (then ``weight_decay`` is AdamW's decoupled decay). ``x`` should be
    standardised."""
    layer = nn.Linear(x.shape[1], y.shape[1]).to(x.device)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    target = y.argmax(1) if single_label else y

    def data_loss() -> torch.Tensor:
        logits = layer(x)
        return F.cross_entropy(logits, target) if single_label else F.binary_cross_entropy_with_logits(logits, target)

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=epochs, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)  # fmt: skip

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = data_loss() + 0.5 * weight_decay * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return layer
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    for i in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / epochs))
        opt.zero_grad(set_to_none=True)
        data_loss().backward()
        opt.step()
    return layer


def _score(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, single_label: bool) -> float:
    with torch.no_grad():
        logits = layer(x)
    return topk_accuracy(logits, y, (1,))["top1"] if single_label else mean_average_precision(logits, y)


def probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    cfg: ProbeConfig | None = None, seed: int = 0,
) -> dict:  # fmt: skip
    """Sweep on a held-out part of train, refit on all of train, score on test (module docstring).

    Returns the test metrics in % (``top1``/``top5``, or ``mAP`` and CP..OF1 on sigmoid
    scores) plus ``lr`` (1 for L-BFGS), ``weight_decay`` and ``holdout_score`` of the chosen
    setting. ``seed`` picks the held-out part.
    """
    cfg = cfg or ProbeConfig()
    single = is_single_label(train_y, test_y)
    n = train_x.shape[0]
    n_hold = max(1, int(round(cfg.holdout * n)))
    if n - n_hold < 2:
        raise ValueError(f"linear probe: {n} train images are too few for a held-out part (probe.holdout)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    hold, fit = perm[:n_hold], perm[n_hold:]
    xf, xh = standardize(train_x[fit], train_x[hold])
    best = None
    for lr in cfg.lrs if cfg.optimizer == "adamw" else [1.0]:
        for wd in cfg.weight_decays:
            layer = fit_linear(xf, train_y[fit], single, cfg.epochs, lr, wd, cfg.optimizer)
            score = _score(layer, xh, train_y[hold], single)
            if best is None or score > best[0]:
                best = (score, lr, wd)
    score, lr, wd = best
    xtr, xte = standardize(train_x, test_x)
    layer = fit_linear(xtr, train_y, single, cfg.epochs, lr, wd, cfg.optimizer)
    with torch.no_grad():
        logits = layer(xte)
    metrics = topk_accuracy(logits, test_y) if single else multilabel_metrics(logits.sigmoid(), test_y)
    return {**metrics, "train_score": _score(layer, xtr, train_y, single), "lr": lr, "weight_decay": wd,
            "holdout_score": score}  # fmt: skip
