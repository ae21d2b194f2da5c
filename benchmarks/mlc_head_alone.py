"""The MLC head trained alone on frozen features: can it learn a source's tags, and with which loss?

Feature maps of a frozen backbone (a preset's random initialisation, or a run's backbone) are
computed once for ``--train-images`` training and ``--eval-images`` held-out images (evaluation
transform, no augmentation); then the preset's Query2Label head, and a linear layer on the
feature-map mean for reference, are trained on them with AdamW and scored by val mAP over the tags
present. It separates what the head and its loss can do from what joint pre-training gives them.

    python benchmarks/mlc_head_alone.py -c cpu-emoji                        # random-init features
    python benchmarks/mlc_head_alone.py -c cpu-emoji --run runs/emoji/mlc-s0 --variants paper
    python benchmarks/mlc_head_alone.py -c cpu-emoji --steps 300 --schedule cosine --variants paper
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hvpmtl.backbones import build_backbone
from hvpmtl.config import load_config
from hvpmtl.eval.frozen import eval_images
from hvpmtl.objectives.mlc import MLCConfig, Query2LabelDecoder, weighted_asymmetric_loss

VARIANTS = {  # name: (head, loss, MLCConfig overrides)
    "linear-bce": ("linear", "bce", {}),
    "paper": ("q2l", "paper", {}),
    "bce": ("q2l", "bce", {}),
    "asl": ("q2l", "asl", {}),
    "prior": ("q2l", "paper", {"prior": 0.01}),
    "no-dropout": ("q2l", "paper", {"dropout": 0.0}),
}


def feature_maps(backbone: nn.Module, dataset, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    maps, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=1):
            fmap, _ = backbone(x, None)
            maps.append(fmap.half())
            labels.append(y.float())
    return torch.cat(maps), torch.cat(labels)


def mean_ap(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the tags with a positive of the average precision (%)."""
    aps = []
    for c in range(y.shape[1]):
        if y[:, c].sum() == 0:
            continue
        hits = y[scores[:, c].argsort(descending=True), c]
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum() / hits.sum())
    return 100 * torch.stack(aps).mean().item()


class Head(nn.Module):
    def __init__(self, kind: str, in_dim: int, num_classes: int, cfg: MLCConfig):
        super().__init__()
        self.kind = kind
        self.net = Query2LabelDecoder(in_dim, num_classes, cfg) if kind == "q2l" else nn.Linear(in_dim, num_classes)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.net(fmap)[0] if self.kind == "q2l" else self.net(fmap.mean((2, 3)))


def loss_fn(name: str, cfg: MLCConfig):
    """BCE, or Eq. (1) with the paper's or ASL's focusing, reduced and weighted as pre-training does."""
    if name == "bce":
        return F.binary_cross_entropy_with_logits
    gp, gn = (4.0, 1.0) if name == "paper" else (0.0, 4.0)
    reduction = {"global_sum": "sum"}.get(cfg.reduction, cfg.reduction)
    scale = cfg.weight * (cfg.sum_images if cfg.reduction == "per_image" else 1.0)
    return lambda logits, y: weighted_asymmetric_loss(logits, y, cfg.eta, gp, gn, cfg.clip, reduction) * scale


def lr_factor(step: int, steps: int, schedule: str) -> float:
    if schedule == "cosine":  # the CPU presets': 20 warm-up steps, then cosine down to 1 % of the peak
        if step < 20:
            return (step + 1) / 20
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - 20) / (steps - 20)))
    return min(1.0, (step + 1) / 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default="cpu-emoji")
    ap.add_argument("--run", help="a run folder whose backbone.safetensors gives the features (default: random init)")
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="constant after 100 warm-up steps, or the CPU presets' 20 warm-up steps then cosine to lr/100",
    )
    ap.add_argument("--every", type=int, default=500, help="evaluate every this many steps")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    backbone = build_backbone(cfg.backbone).eval()
    if args.run:
        from safetensors.torch import load_file

        backbone.model.load_state_dict(load_file(f"{args.run}/backbone.safetensors"))
    start = time.time()
    train_x, train_y = feature_maps(backbone, eval_images(cfg.data, cfg.backbone.img_size, "train", args.train_images))
    val_x, val_y = feature_maps(backbone, eval_images(cfg.data, cfg.backbone.img_size, "val", args.eval_images))
    print(f"features {tuple(train_x.shape)} / {tuple(val_x.shape)} in {time.time() - start:.0f} s; "
          f"a random scorer: {mean_ap(torch.rand_like(val_y), val_y):.1f} mAP")  # fmt: skip
    print(f"| variant | val mAP every {args.every} steps |\n|---|---|")
    for name in args.variants.split(","):
        kind, loss_name, extra = VARIANTS[name]
        mlc = MLCConfig(**{**vars(cfg.tasks.mlc), **extra})
        torch.manual_seed(0)
        head = Head(kind, train_x.shape[1], train_y.shape[1], mlc)
        opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.05)
        loss = loss_fn(loss_name, mlc)
        g, scores = torch.Generator().manual_seed(0), []
        for s in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(s, args.steps, args.schedule)
            i = torch.randint(0, len(train_x), (cfg.data.batch_size,), generator=g)
            head.train()
            value = loss(head(train_x[i].float()), train_y[i])
            opt.zero_grad()
            value.backward()
            opt.step()
            if (s + 1) % args.every == 0:
                head.eval()
                with torch.no_grad():
                    out = torch.cat([head(val_x[j : j + 256].float()) for j in range(0, len(val_x), 256)])
                scores.append(f"{mean_ap(out, val_y):.1f}")
        print(f"| {name} | {' / '.join(scores)} |", flush=True)


if __name__ == "__main__":
    main()
