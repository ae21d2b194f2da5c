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

FOCUSING = {"paper": (4.0, 1.0), "asl": (0.0, 4.0)}  # (gamma_pos, gamma_neg)
REDUCTIONS = ("per_image", "global_sum", "mean")


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
    # "per_image": sum over classes, mean over images, times ``sum_images`` -- ASL's and Query2Label's
    # per-GPU sum averaged by DDP over the paper's 16 images per GPU, so alpha_1 means the same at
    # any batch size and process count | "global_sum": summed over the whole global batch (alpha_1's
    # pull grows with the batch) | "mean": over classes and images
    reduction: str = "per_image"
    sum_images: float = 16.0  # the paper's images per GPU (batch 1024 on 64 GPUs)
    # ASL's reference detaches the focusing weights (1-p)^g+ and p_m^g- (disable_torch_grad_focal_loss,
    # kept by Query2Label's commands); off = Eq. (1) differentiated as written (1.4-3.1x the gradient)
    detach_focusing: bool = False

    def validate(self, prefix: str = "") -> None:
        if self.focusing not in FOCUSING:
            raise ValueError(f"{prefix}.focusing: expected one of {sorted(FOCUSING)}, got '{self.focusing}'")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{prefix}.reduction: expected one of {REDUCTIONS}, got '{self.reduction}'")
        if not self.sum_images > 0:
            raise ValueError(f"{prefix}.sum_images={self.sum_images} must be > 0")
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q(q)), heads(self.k(k)), heads(self.v(v)), dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).flatten(2))


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

    def forward(self, tgt, query_pos, memory, memory_pos):
        if self.self_attn is not None:
            q = tgt + query_pos
            tgt = self.norm_self(tgt + self.drop(self.self_attn(q, q, tgt)))
        tgt = self.norm_cross(tgt + self.drop(self.cross_attn(tgt + query_pos, memory + memory_pos, memory)))
        return self.norm_ffn(tgt + self.drop(self.ffn(tgt)))


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
        self.dim = cfg.dim

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return logits ``B x C``, label features ``h: B x C x d`` and projected memory ``B x HW x d``."""
        B, _, H, W = fmap.shape
        memory = self.input_proj(fmap).flatten(2).transpose(1, 2)  # B x HW x d
        # Sine encoding for this feature map's actual size (not a size fixed at build time).
        memory_pos = build_sincos2d_pos_embed([H, W], self.dim, device=fmap.device).to(memory.dtype)
        query_pos = self.label_embed.weight.unsqueeze(0).expand(B, -1, -1)
        tgt = torch.zeros_like(query_pos)
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, memory_pos)
        h = self.norm(tgt)  # B x C x d
        logits = (h * self.cls_weight).sum(-1) + self.cls_bias
        return logits, h, memory

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
) -> torch.Tensor:
    """Eq. (1): ``L+ = -eta (1-p)^g+ log p`` on positives, ``L- = -p_m^g- log(1-p_m)`` on negatives.

    ``p = sigmoid(logits)``; ``p_m = max(p - clip, 0)`` is ASL's probability shift (``clip=0``:
    ``p_m = p``). ``detach_focusing``: the weights ``(1-p)^g+`` and ``p_m^g-`` carry no gradient
    (ASL's reference). Computed in fp32. ``logits, targets: B x C``; ``reduction``: ``sum`` over
    images and classes, ``per_image`` (sum over classes, mean over images) or ``mean``.
    """
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
    if reduction == "per_image":
        return loss.sum(1).mean()
    return loss.sum() if reduction == "sum" else loss.mean()
