"""Each objective's share of the backbone gradient (``grad_share_<task>`` in metrics.csv).

``share_t = ||g_t|| / sum_j ||g_j||``, ``g_t`` the gradient of objective ``t``'s term of the loss
(weight and the engine's rescaling included) w.r.t. the backbone parameters. ``autograd.grad``
neither touches ``.grad`` nor fires DDP's reducer hooks, so measuring leaves training unchanged.
"""

from __future__ import annotations

import torch

from hvpmtl.engine.distributed import DistEnv, all_reduce_sum


def grad_shares(terms: dict[str, torch.Tensor], params: list[torch.Tensor], env: DistEnv) -> dict[str, float]:
    """``{task: share}`` from this process's ``terms`` (scalar losses sharing one graph, kept for
    the backward that follows), averaged over processes; one host sync."""
    norms = []
    for term in terms.values():
        grads = [g for g in torch.autograd.grad(term, params, retain_graph=True, allow_unused=True) if g is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros((), device=env.device))
    norms = torch.stack(norms).detach()
    shares = all_reduce_sum(norms / norms.sum().clamp_min(1e-30), env) / env.world_size
    return dict(zip(terms, shares.tolist()))
