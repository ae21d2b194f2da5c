"""Multi-label classification (MLC): Query2Label decoder + weighted asymmetric loss, Eq. (1).

Head (Sec. 3.2 of the paper, details from Query2Label's code): the last-stage feature map
``B x d0 x H x W`` is projected to ``d`` channels, given a 2-D sine position encoding computed for
its actual size, and read by ``C`` learnable label embeddings ``Q0`` acting as query position
embeddings on a zero initial target, through a Transformer decoder whose self-attention is off
by default. Each class gets its own linear read-out: ``logit_c = sum_d W[c, d] h[c, d] + b[c]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from hvpmtl.objectives.base import Objective, register_objective

FOCUSING = {"paper": (4.0, 1.0), "asl": (0.0, 4.0)}  # (gamma_pos, gamma_neg)
REDUCTIONS = ("query2label", "per_image", "global_sum", "mean")
QUERY2LABEL_SCALE = 1000.0  # Query2Label's AsymmetricLossOptimized: -loss.sum() / B / C * 1000


@dataclass
class MLCConfig:
    """Query2Label decoder and weighted asymmetric loss; defaults are the paper's (Sec. 3.3)."""

    weight: float = 0.001  # alpha_1
    dim: int = 768  # decoder width d
    num_layers: int = 2
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    self_attn: bool = False  # Query2Label's default removes the queries' self-attention
    eta: float = 10.0  # positive weight
    focusing: str = "paper"  # "paper": gamma+=4, gamma-=1 as written; "asl": gamma+=0, gamma-=4
    gamma_pos: float | None = None  # explicit values override ``focusing``
    gamma_neg: float | None = None
    clip: float = 0.0  # ASL's probability margin m on negatives (0.05 in ASL); 0 = off
    # "query2label": mean over images and classes times 1000, Query2Label's training loss (whose decoder
    # the paper takes); at alpha_1 = 0.001 the factor cancels and alpha_1 * L is the per-element mean |
    # "per_image": sum over classes, mean over images, times ``sum_images`` -- ASL's own repository
    # (-loss.sum() per GPU, averaged by DDP) at the paper's 16 images per GPU | "global_sum": summed
    # over the whole global batch (alpha_1's pull grows with the batch) | "mean": over classes and
    # images. All but global_sum are per-process means, so they mean the same at any batch size and
    # process count; docs/method.md gives the per-element weight of each.
    reduction: str = "query2label"
    sum_images: float = 16.0  # per_image only: the paper's images per GPU (batch 1024 on 64 GPUs)
    # ASL's reference detaches the focusing weights (1-p)^g+ and p_m^g- (disable_torch_grad_focal_loss,
    # kept by Query2Label's commands); off = Eq. (1) differentiated as written (1.4-3.1x the gradient)
    detach_focusing: bool = False
    # Starting probability of every tag: the read-out bias starts at log(p / (1 - p)), the prior
    # initialisation of focal-loss heads for rare positives; None = Query2Label's uniform bias init
    prior: float | None = None

    def validate(self, prefix: str = "") -> None:
        if self.focusing not in FOCUSING:
            raise ValueError(f"{prefix}.focusing: expected one of {sorted(FOCUSING)}, got '{self.focusing}'")
        if self.reduction == "sum":  # runs saved before per_image existed: the same loss as global_sum
            self.reduction = "global_sum"
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{prefix}.reduction: expected one of {REDUCTIONS}, got '{self.reduction}'")
        if not self.sum_images > 0:
            raise ValueError(f"{prefix}.sum_images={self.sum_images} must be > 0")
        if self.prior is not None and not 0.0 < self.prior < 1.0:
            raise ValueError(f"{prefix}.prior={self.prior} must be in (0, 1), or null for Query2Label's init")
        if self.dim % self.num_heads or self.dim % 4:
            raise ValueError(f"{prefix}.dim={self.dim} must be divisible by num_heads and by 4")

    @property
    def gammas(self) -> tuple[float, float]:
        gp, gn = FOCUSING[self.focusing]
        return (gp if self.gamma_pos is None else self.gamma_pos, gn if self.gamma_neg is None else self.gamma_neg)


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value inputs (positions added by the caller)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q(q)), self._heads(self.k(k)), self._heads(self.v(v)),
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.proj(out.transpose(1, 2).flatten(2))

    def weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The attention probabilities :meth:`forward` applies (before dropout), ``B x heads x Lq x Lk``;
        computed apart because the fused kernel does not return them."""
        q, k = self._heads(self.q(q)), self._heads(self.k(k))
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)


class DecoderLayer(nn.Module):
    """DETR/Query2Label post-norm decoder layer: [self-attn], cross-attn, FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, self_attn: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout) if self_attn else None
        self.norm_self = nn.LayerNorm(dim) if self_attn else None
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm_ffn = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _self_attend(self, tgt, query_pos):
        if self.self_attn is not None:
            q = tgt + query_pos
            tgt = self.norm_self(tgt + self.drop(self.self_attn(q, q, tgt)))
        return tgt

    def forward(self, tgt, query_pos, memory, memory_pos):
        tgt = self._self_attend(tgt, query_pos)
        tgt = self.norm_cross(tgt + self.drop(self.cross_attn(tgt + query_pos, memory + memory_pos, memory)))
        return self.norm_ffn(tgt + self.drop(self.ffn(tgt)))

    def cross_attention_weights(self, tgt, query_pos, memory, memory_pos) -> torch.Tensor:
        """What :meth:`forward`'s cross-attention reads: ``B x heads x C x HW`` probabilities."""
        return self.cross_attn.weights(self._self_attend(tgt, query_pos) + query_pos, memory + memory_pos)


class Query2LabelDecoder(nn.Module):
    """Feature map ``B x d0 x H x W`` -> per-class logits through label-query cross-attention."""

    def __init__(self, in_dim: int, num_classes: int, cfg: MLCConfig):
        super().__init__()
        self.input_proj = nn.Conv2d(in_dim, cfg.dim, kernel_size=1)  # the paper's d0 -> d projection
        self.label_embed = nn.Embedding(num_classes, cfg.dim)  # Q0
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.self_attn)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        # Group-wise linear read-out, initialised as Query2Label's GroupWiseLinear.
        bound = 1.0 / math.sqrt(cfg.dim)
        self.cls_weight = nn.Parameter(torch.empty(num_classes, cfg.dim).uniform_(-bound, bound))
        self.cls_bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))
        if cfg.prior is not None:  # every tag starts at probability ``prior``
            self.cls_bias.data.fill_(math.log(cfg.prior / (1.0 - cfg.prior)))
        self.dim = cfg.dim

    def _inputs(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected memory ``B x HW x d``, its position encoding ``HW x d``, the queries ``B x C x d``."""
        B, _, H, W = fmap.shape
        memory = self.input_proj(fmap).flatten(2).transpose(1, 2)  # B x HW x d
        # Sine encoding for this feature map's actual size (not a size fixed at build time).
        memory_pos = build_sincos2d_pos_embed([H, W], self.dim, device=fmap.device).to(memory.dtype)
        return memory, memory_pos, self.label_embed.weight.unsqueeze(0).expand(B, -1, -1)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return logits ``B x C``, label features ``h: B x C x d`` and projected memory ``B x HW x d``."""
        memory, memory_pos, query_pos = self._inputs(fmap)
        tgt = torch.zeros_like(query_pos)
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, memory_pos)
        h = self.norm(tgt)  # B x C x d
        logits = (h * self.cls_weight).sum(-1) + self.cls_bias
        return logits, h, memory

    @torch.no_grad()
    def cross_attention(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``B x C`` and where each label query looks: the last layer's cross-attention over
        the feature map, averaged over heads, ``B x C x H x W`` (each map sums to 1). For pictures;
        training calls :meth:`forward`, which the fused attention kernel keeps fast.

        >>> logits, maps = decoder.cross_attention(fmap)  # fmap: B x d0 x H x W
        """
        memory, memory_pos, query_pos = self._inputs(fmap)
        tgt = torch.zeros_like(query_pos)
        for layer in self.layers[:-1]:
            tgt = layer(tgt, query_pos, memory, memory_pos)
        last = self.layers[-1]
        maps = last.cross_attention_weights(tgt, query_pos, memory, memory_pos).mean(1)  # B x C x HW
        h = self.norm(last(tgt, query_pos, memory, memory_pos))
        logits = (h * self.cls_weight).sum(-1) + self.cls_bias
        return logits, maps.unflatten(-1, fmap.shape[-2:])

    def no_weight_decay(self) -> set[str]:
        return {"label_embed.weight"}


def weighted_asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    eta: float = 10.0,
    gamma_pos: float = 4.0,
    gamma_neg: float = 1.0,
    clip: float = 0.0,
    reduction: str = "sum",
    detach_focusing: bool = False,
    known: torch.Tensor | None = None,
    known_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (1): ``L+ = -eta (1-p)^g+ log p`` on positives, ``L- = -p_m^g- log(1-p_m)`` on negatives.

    ``p = sigmoid(logits)``; ``p_m = max(p - clip, 0)`` is ASL's probability shift (``clip=0``:
    ``p_m = p``). ``detach_focusing``: the weights ``(1-p)^g+`` and ``p_m^g-`` carry no gradient
    (ASL's reference). Computed in fp32. ``logits, targets: B x C``; ``reduction``: ``sum`` over
    images and classes (ASL's repository), ``per_image`` (sum over classes, mean over images),
    ``mean``, or ``query2label`` (``sum / B / C * 1000``, Query2Label's ``AsymmetricLossOptimized``).

    ``known`` (bool, ``B x 1`` per image or ``B x C`` per element): only known elements count;
    the means are over known elements (``per_image``: over images with a known element), and
    nothing known gives 0 with zero gradient. ``known_counts`` (:func:`known_counts` of the whole
    global batch divided by its number of shards) replaces this batch's own counts, so that
    shards averaged as mean losses are (processes x micro-batches) give the global batch's mean.
    """
    if reduction not in ("sum", "per_image", "mean", "query2label"):
        raise ValueError(f"weighted_asymmetric_loss: unknown reduction '{reduction}'")
    x = logits.float()
    y = targets.float()
    p = torch.sigmoid(x)
    if clip > 0:
        p_neg = (p - clip).clamp(min=0.0)
        log_neg = torch.log((1.0 - p_neg).clamp(min=1e-8))
    else:
        p_neg, log_neg = p, F.logsigmoid(-x)
    w_pos, w_neg = (1.0 - p).pow(gamma_pos), p_neg.pow(gamma_neg)
    if detach_focusing:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    loss_pos = eta * w_pos * F.logsigmoid(x)
    loss_neg = w_neg * log_neg
    loss = -(y * loss_pos + (1.0 - y) * loss_neg)
    if known is not None:
        return _known_reduction(loss, known, reduction, known_counts)
    if reduction == "per_image":
        return loss.sum(1).mean()
    if reduction == "query2label":
        return loss.mean() * QUERY2LABEL_SCALE
    return loss.sum() if reduction == "sum" else loss.mean()


def known_counts(known: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[known elements, images with a known element]`` (float) of a ``B x 1`` or ``B x C`` known-mask."""
    images = known.any(1).sum()
    elements = images * num_classes if known.shape[1] == 1 else known.sum()
    return torch.stack([elements, images]).float()


def _known_reduction(loss: torch.Tensor, known: torch.Tensor, reduction: str, counts: torch.Tensor | None):
    """``loss`` (``B x C``) reduced over its known elements, divided by ``counts`` (or its own)."""
    total = torch.where(known.expand_as(loss), loss, 0.0).sum()  # where, not *: an unknown inf/nan stays out
    if reduction == "sum":
        return total
    counts = known_counts(known, loss.shape[1]) if counts is None else counts.to(loss.device, loss.dtype)
    n = counts[1] if reduction == "per_image" else counts[0]
    mean = total / torch.where(n > 0, n, 1.0)  # nothing known in the global batch: 0, zero gradient
    return mean * QUERY2LABEL_SCALE if reduction == "query2label" else mean


@register_objective("mlc", MLCConfig)
class MLCObjective(Objective):
    """Eq. (1) on the Query2Label decoder's logits for the clean view (``tasks.routing.mlc_masked``:
    the masked one). Outputs ``logits`` (detached) and leaves ``(logits, h, memory)`` in
    ``step.shared["mlc"]`` for momentum distillation, which needs the decoder even at weight 0."""

    modules = ("mlc",)
    reads_labels = True

    def build(self, model: nn.Module, num_classes: int | None) -> dict[str, nn.Module]:
        if not num_classes:
            raise ValueError("num_classes (data.num_classes) must be set when tasks.mlc or tasks.distill is on")
        return {"mlc": Query2LabelDecoder(model.backbone.num_features, num_classes, self.cfg)}

    def inputs(self, plan) -> dict:
        return {"mlc": (plan.masked_view, plan.masking) if plan.routing.mlc_masked else (plan.clean_view, False)}

    def forward(self, model: nn.Module, step, with_loss: bool) -> dict[str, torch.Tensor]:
        logits, h, memory = model.mlc(step.fmap("mlc"))
        step.shared["mlc"] = (logits, h, memory)
        out = {"logits": logits.detach()}
        if with_loss:
            if step.labels is None:
                raise ValueError("batch['labels'] (B x C multi-hot) is required when tasks.mlc is on")
            c = self.cfg
            gp, gn = c.gammas
            reduction = {"global_sum": "sum"}.get(c.reduction, c.reduction)
            loss = weighted_asymmetric_loss(logits, step.labels, c.eta, gp, gn, c.clip, reduction, c.detach_focusing,
                                            step.known, step.known_counts)  # fmt: skip
            out["loss"] = loss * c.sum_images if c.reduction == "per_image" else loss
        return out

    @property
    def sums_over_images(self) -> bool:
        return self.cfg.reduction == "global_sum"
