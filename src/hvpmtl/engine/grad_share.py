"""Each objective's share of the backbone gradient (``grad_share_<task>`` in metrics.csv) and the
cosine between every two objectives' gradients (``grad_cos_<task>_<task>``).

``share_t = ||g_t|| / sum_j ||g_j||`` and ``cos_st = <g_s, g_t> / (||g_s|| ||g_t||)``, ``g_t`` the
gradient of objective ``t``'s term of the loss (weight and the engine's rescaling included) w.r.t.
the backbone parameters. A share says which term is loud; a negative cosine says which two terms
pull the backbone apart. ``autograd.grad`` neither touches ``.grad`` nor fires DDP's reducer hooks,
so measuring leaves training unchanged.
"""

from __future__ import annotations

from itertools import combinations

import torch

from hvpmtl.engine.distributed import DistEnv, all_reduce_sum


def pair_key(a: str, b: str) -> str:
    """``grad_cos_<a>_<b>`` for the metrics of tasks ``a`` and ``b`` (in the tasks' order)."""
    return f"grad_cos_{a}_{b}"


def _dot(xs: tuple[torch.Tensor | None, ...], ys: tuple[torch.Tensor | None, ...], zero: torch.Tensor) -> torch.Tensor:
    """``<x, y>`` over all parameters (fp32); a parameter without gradient on either side adds 0."""
    return sum((torch.dot(x.flatten().float(), y.flatten().float()) for x, y in zip(xs, ys)
                if x is not None and y is not None), zero)  # fmt: skip


def grad_shares(terms: dict[str, torch.Tensor], params: list[torch.Tensor], env: DistEnv) -> dict[str, float]:
    """``{"grad_share_<task>": share, "grad_cos_<a>_<b>": cosine}`` from this process's ``terms``
    (``{task: scalar loss}`` sharing one graph, kept for the backward that follows), each averaged
    over processes (the cosine of each process's gradients, not of their sum); one host sync."""
    names = list(terms)
    grads = [torch.autograd.grad(terms[t], params, retain_graph=True, allow_unused=True) for t in names]
    zero = torch.zeros((), device=env.device)
    norms = torch.stack([_dot(g, g, zero).sqrt() for g in grads])
    pairs = list(combinations(range(len(names)), 2))
    cosines = [_dot(grads[i], grads[j], zero) / (norms[i] * norms[j]).clamp_min(1e-30) for i, j in pairs]
    stats = torch.cat([norms / norms.sum().clamp_min(1e-30), torch.stack(cosines) if cosines else norms[:0]])
    stats = (all_reduce_sum(stats.detach(), env) / env.world_size).tolist()
    keys = [f"grad_share_{t}" for t in names] + [pair_key(names[i], names[j]) for i, j in pairs]
    return dict(zip(keys, stats))
