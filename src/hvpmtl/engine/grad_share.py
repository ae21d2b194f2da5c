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


def grad_share_keys(tasks: list[str] | tuple[str, ...]) -> list[str]:
    """The metric names :func:`grad_shares` returns for ``tasks``, in its order: ``grad_share_<t>``
    per task, then ``grad_cos_<a>_<b>`` per pair (in the tasks' order)."""
    return [f"grad_share_{t}" for t in tasks] + [f"grad_cos_{a}_{b}" for a, b in combinations(tasks, 2)]


def grad_shares(terms: dict[str, torch.Tensor], params: list[torch.Tensor], env: DistEnv) -> dict[str, float]:
    """``{"grad_share_<task>": share, "grad_cos_<a>_<b>": cosine}`` from this process's ``terms``
    (``{task: scalar loss}`` sharing one graph, kept for the backward that follows), each averaged
    over processes (the cosine of each process's gradients, not of their sum); one host sync.

    Each task's gradient becomes one fp32 row of ``G`` (a parameter it does not reach: zeros), so
    every norm and inner product comes from one Gram matrix ``G G^T``."""
    names = list(terms)
    rows = torch.zeros(len(names), sum(p.numel() for p in params), device=env.device)
    for row, t in zip(rows, names):
        grads = torch.autograd.grad(terms[t], params, retain_graph=True, allow_unused=True)
        row.copy_(torch.cat([p.new_zeros(p.numel()) if g is None else g.flatten() for g, p in zip(grads, params)]))
    gram = rows @ rows.t()
    norms = gram.diagonal().sqrt()
    i, j = torch.triu_indices(len(names), len(names), offset=1, device=env.device)
    cosines = gram[i, j] / (norms[i] * norms[j]).clamp_min(1e-30)
    stats = torch.cat([norms / norms.sum().clamp_min(1e-30), cosines]).detach()
    stats = (all_reduce_sum(stats, env) / env.world_size).tolist()
    return dict(zip(grad_share_keys(names), stats))
