"""Contrastive learning by online clustering (CL): SwAV head, truncated Sinkhorn-Knopp, Eqs. (2)-(3).

Head: projection MLP -> L2-normalised feature ``z`` -> dot products with ``K`` L2-normalised
prototypes (a bias-free linear layer re-normalised every step, frozen for the first iterations).
Codes come from Sinkhorn-Knopp over the (global) batch, run in fp32 without gradient, guarded
against overflow in ``exp(score / eps)`` by the paper's clamp at ``T_max`` or in the log domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hvpmtl.objectives.base import Objective, register_objective

STABILIZERS = ("truncate", "max_shift", "none")
MAX_QUEUE_BYTES = 4 * 10**9  # the queue plus its scores against the prototypes (SwAV's 3840 images: 96 MB)


def _decimal_bytes(n: int) -> str:
    """``5004800000`` -> ``"5.0 GB"``."""
    units, value, k = ("B", "kB", "MB", "GB", "TB", "PB", "EB"), float(n), 0
    while value >= 1000 and k < len(units) - 1:
        value, k = value / 1000, k + 1
    return f"{value:.1f} {units[k]}"


@dataclass
class SwAVConfig:
    """SwAV head and loss; defaults are SwAV's, ``t_max`` and the weight are the paper's."""

    weight: float = 0.02  # alpha_2
    hidden_dim: int = 2048
    out_dim: int = 128
    num_prototypes: int = 3000
    head_norm: str = "bn"  # "bn" (SwAV; SyncBatchNorm under DDP) | "ln" | "none"
    temperature: float = 0.1  # tau
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    stabilize: str = "truncate"  # "truncate" at t_max (paper) | "max_shift" (log-domain) | "none" (SwAV)
    t_max: float = 10.0
    freeze_prototypes_iters: int = 313
    # SwAV's queue for small batches (off in the paper, whose global batch is 1024): the features
    # of the last `queue_length` images per view join each Sinkhorn, so that the equal partition
    # spreads the batch over prototypes as a larger one would. Replicated on every process.
    queue_length: int = 0
    queue_start_iters: int = 0  # use the queue from this iteration on, once it is full

    def validate(self, prefix: str = "") -> None:
        if self.stabilize not in STABILIZERS:
            raise ValueError(f"{prefix}.stabilize: expected one of {STABILIZERS}, got '{self.stabilize}'")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"{prefix}.sinkhorn_iters={self.sinkhorn_iters} must be >= 1")
        if self.queue_length < 0 or self.queue_start_iters < 0:
            raise ValueError(f"{prefix}.queue_length and {prefix}.queue_start_iters must be >= 0")
        queue_bytes = 2 * self.queue_length * (self.out_dim + self.num_prototypes) * 4
        if queue_bytes > MAX_QUEUE_BYTES:  # refused here: allocating it fails (or is killed) only later
            raise ValueError(
                f"{prefix}.queue_length={self.queue_length}: the queue and its prototype scores would take "
                f"{_decimal_bytes(queue_bytes)} on every process (2 x queue_length x (out_dim + num_prototypes) "
                f"x 4 bytes); at most {_decimal_bytes(MAX_QUEUE_BYTES)} (SwAV queues a few thousand images)"
            )
        if self.head_norm not in ("bn", "ln", "none"):
            raise ValueError(f"{prefix}.head_norm: expected 'bn', 'ln' or 'none', got '{self.head_norm}'")


class SwAVHead(nn.Module):
    """Pooled feature ``N x d0`` -> (prototype scores ``N x K``, normalised features ``N x out_dim``)."""

    def __init__(self, in_dim: int, cfg: SwAVConfig):
        super().__init__()
        norm = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm, "none": lambda _: nn.Identity()}[cfg.head_norm]
        self.projection = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim), norm(cfg.hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.out_dim),
        )  # fmt: skip
        self.prototypes = nn.Linear(cfg.out_dim, cfg.num_prototypes, bias=False)
        self.normalize_prototypes()
        self.queue_filled = 0  # rows of the queue holding features (a host copy of the buffer)
        if cfg.queue_length:  # per view, newest first, as in SwAV; both travel in checkpoints
            self.register_buffer("queue", torch.zeros(2, cfg.queue_length, cfg.out_dim))
            self.register_buffer("queue_rows", torch.zeros((), dtype=torch.long))
            self.register_load_state_dict_post_hook(SwAVHead._read_queue_rows)

    @staticmethod
    def _read_queue_rows(module: SwAVHead, incompatible_keys) -> None:
        module.queue_filled = int(module.queue_rows)  # once per load, not per step (no device sync)

    @torch.no_grad()
    def push(self, z_a: torch.Tensor, z_b: torch.Tensor) -> None:
        """Put this step's normalised features of both views (the global batch) first in the queue;
        the count of filled rows follows in :meth:`count_pushed`, outside the forward."""
        new = torch.stack([z_a, z_b]).to(self.queue.dtype)[:, : self.queue.shape[1]]
        self.queue.copy_(torch.cat([new, self.queue[:, : self.queue.shape[1] - new.shape[1]]], dim=1))

    def host_state(self) -> int:
        """The host copy of the fill count, which a skipped step's buffer restore puts back
        (:class:`~hvpmtl.engine.guards.BufferSnapshot`) with the queue and ``queue_rows``."""
        return self.queue_filled

    def set_host_state(self, filled: int) -> None:
        self.queue_filled = filled

    @torch.no_grad()
    def count_pushed(self, rows: int) -> None:
        """Count ``rows`` more queued rows (host copy and buffer; no device sync)."""
        self.queue_filled = min(self.queue_filled + rows, self.queue.shape[1])
        self.queue_rows.fill_(self.queue_filled)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (SwAV does this before every step)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen prototypes get an all-zero gradient in the backward (rather than none), so that
        every trainable parameter takes part in each step and DDP needs no search for unused
        parameters; :meth:`SwAVObjective.before_step` then drops it before the optimiser step."""
        z = F.normalize(self.projection(x), dim=1)  # unnormalised inputs give NaN in Sinkhorn
        w = self.prototypes.weight
        if freeze_prototypes:
            w = w.detach() + 0.0 * w
        return z @ w.t(), z


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` from every process, in rank order (no gradient): the global batch."""
    if _world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _global_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` over ``dim`` of the global batch (all-reduce max, then sum), keepdim."""
    m = _all_reduce(x.amax(dim=dim, keepdim=True).clone(), dist.ReduceOp.MAX)
    return m + torch.log(_all_reduce((x - m).exp().sum(dim=dim, keepdim=True)))


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    stabilize: str = "truncate",
    t_max: float = 10.0,
    queue_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Equal-partition codes ``Q`` (``B x K``, rows sum to 1) for prototype ``scores`` (``B x K``).

    SwAV Alg. 1: ``Q = exp(scores / eps)``, then alternate normalisation so that each prototype
    receives ``B/K`` of the batch and each image a distribution. ``stabilize``:
    ``truncate`` (the paper's guard): ``exp(min(scores / eps, T_max))``;
    ``max_shift``: the same iterations in the log domain (max-shifted log-sum-exp), which gives
    SwAV's codes exactly and can neither overflow nor underflow at any ``eps``;
    ``none``: SwAV's plain version (overflows once ``scores / eps > 88`` in fp32).
    Under an initialised process group every sum runs over the global batch (all-reduce), so
    N processes with batch B give the codes one process with batch N*B gives.

    ``queue_scores`` (``L x K``, the same on every process): the scores of queued images, which
    take part in the partition as more rows of the batch (on one process only, so that the
    global sums count them once); only the batch's codes are returned.
    """
    logits = scores.float() / epsilon
    world = _world_size()
    rows = logits.shape[0]
    num_protos, batch = logits.shape[1], rows * world
    if queue_scores is not None:
        batch += queue_scores.shape[0]
        if world == 1 or dist.get_rank() == 0:
            logits = torch.cat([queue_scores.float() / epsilon, logits])
    if stabilize == "max_shift":
        log_q = logits  # B x K; the first global normalisation cancels in the first prototype step
        for _ in range(iterations):
            log_q = log_q - _global_logsumexp(log_q, dim=0) - math.log(num_protos)
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(batch)
        return (log_q + math.log(batch)).exp()[-rows:]
    if stabilize == "truncate":
        logits = logits.clamp(max=t_max)
    q = torch.exp(logits).t()  # K x B
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        q /= num_protos
        q /= q.sum(dim=0, keepdim=True)  # each image: total mass 1/B
        q /= batch
    q *= batch
    return q.t()[-rows:]


def swapped_prediction_loss(
    scores_a: torch.Tensor, scores_b: torch.Tensor, codes_a: torch.Tensor, codes_b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Eqs. (2)-(3): ``L = l(f_a, q_b) + l(f_b, q_a)``, ``l(f, q) = -sum_k q_k log softmax(f.c / tau)_k``,
    averaged over the batch."""
    log_p_a = F.log_softmax(scores_a.float() / temperature, dim=1)
    log_p_b = F.log_softmax(scores_b.float() / temperature, dim=1)
    return -(codes_b * log_p_a).sum(1).mean() - (codes_a * log_p_b).sum(1).mean()


def swav_loss(
    scores_a: torch.Tensor, scores_b: torch.Tensor, cfg: SwAVConfig, queue_scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for both views (``queue_scores``: ``2 x L x K``, the queued images' scores per view),
    then the swapped loss. Also returns ``loss / (2 ln K)`` — a value stuck at 1 means the
    assignment collapsed to uniform (SwAV's known failure mode)."""
    queued = queue_scores if queue_scores is not None else (None, None)
    codes = [
        sinkhorn(s.detach(), cfg.epsilon, cfg.sinkhorn_iters, cfg.stabilize, cfg.t_max, q)
        for s, q in zip((scores_a, scores_b), queued, strict=True)
    ]
    loss = swapped_prediction_loss(scores_a, scores_b, codes[0], codes[1], cfg.temperature)
    return loss, loss.detach() / (2 * math.log(scores_a.shape[1]))


@register_objective("swav", SwAVConfig)
class SwAVObjective(Objective):
    """Eq. (2) between the prototype scores of two views: by default the masked view's pass
    (``tasks.routing.swav_masked``) and the clean one's. Logs ``swav_collapse``; the prototypes
    are frozen for the first ``freeze_prototypes_iters`` steps and re-normalised after each.
    """

    modules = ("swav",)
    logged = ("swav_collapse",)

    def build(self, model: nn.Module, num_classes: int | None) -> dict[str, nn.Module]:
        return {"swav": SwAVHead(model.backbone.num_features, self.cfg)}

    def inputs(self, plan) -> dict:
        masked = plan.masking and plan.routing.swav_masked
        return {"swav_a": (plan.masked_view, masked), "swav_b": (plan.clean_view, False)}

    def phase(self, model: nn.Module, iteration: int) -> dict[str, bool]:
        """Prototypes frozen; the queue full and past ``queue_start_iters`` (then it takes part)."""
        c, filled = self.cfg, model.swav.queue_filled
        use_queue = c.queue_length > 0 and filled == c.queue_length and iteration >= c.queue_start_iters
        return {"frozen": iteration < c.freeze_prototypes_iters, "use_queue": use_queue}

    def forward(self, model: nn.Module, step, with_loss: bool) -> dict[str, torch.Tensor]:
        phase, head = step.phases[self.name], model.swav
        scores, z = head(torch.cat([step.pooled("swav_a"), step.pooled("swav_b")]), freeze_prototypes=phase["frozen"])
        sa, sb = scores.chunk(2)
        queued = None
        if phase["use_queue"]:
            with torch.no_grad():
                queued = head.queue @ head.prototypes.weight.t().to(head.queue.dtype)
        if self.cfg.queue_length and head.training:
            head.push(*(all_gather_rows(v) for v in z.detach().chunk(2)))
        loss, collapse = swav_loss(sa, sb, self.cfg, queued)
        return {"swav_collapse": collapse, "loss": loss}

    def after_forward(self, model: nn.Module, batch: dict) -> None:
        """The queue took this step's global batch (this process's images times the processes)."""
        head = model.swav
        if self.cfg.queue_length and head.training:
            head.count_pushed(batch["views"][0].shape[0] * _world_size())

    def before_step(self, model: nn.Module) -> None:
        """Frozen prototypes: no gradient at all, as in SwAV, so AdamW leaves them and their state
        alone (a zero gradient would decay them and count steps, and the first real update after
        the thaw would be bias-corrected as a late one: 1.64x a first step after 313 iterations)."""
        if model.iteration < self.cfg.freeze_prototypes_iters:
            model.swav.prototypes.weight.grad = None

    def after_step(self, model: nn.Module) -> None:
        model.swav.normalize_prototypes()
