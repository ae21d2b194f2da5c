"""Where the label queries look (``hvpmtl visualize attention``).

One row per image: the image, captioned with its true labels, then its ``top_k`` predicted labels,
each as the heat-map of that label query's cross-attention over the feature map (the last
Query2Label decoder layer, heads averaged; :meth:`Query2LabelDecoder.cross_attention`) laid over
the image, captioned with the label's probability: green when the label is true, red when not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hvpmtl.runs import model_part
from hvpmtl.viz.grid import BAD, GOOD, INK, denormalize, enlarge, overlay, tile_grid


@torch.no_grad()
def label_attention(model, images: torch.Tensor, teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``B x C`` and cross-attention maps ``B x C x h x w`` of normalised ``images``
    under the MLC head of ``model`` (an :class:`hvpmtl.HVPMTL`; its EMA teacher with ``teacher``)."""
    if model.mlc is None:
        raise ValueError("this model has no MLC decoder (tasks.mlc and tasks.distill were off)")
    backbone, head = model_part(model, "teacher" if teacher else "student")
    fmap, _ = backbone(images, None)
    logits, maps = head.cross_attention(fmap)
    return logits.float().sigmoid(), maps.float()


def attention_grid(
    images: torch.Tensor,
    probs: torch.Tensor,
    maps: torch.Tensor,
    classes: Sequence[str],
    labels: torch.Tensor | None = None,
    top_k: int = 3,
    scale: int = 1,
) -> torch.Tensor:
    """uint8 picture ``3 x H x W``: ``B`` rows of ``1 + top_k`` tiles of side ``T = S scale`` with a
    caption band each, ``H = B (T + CAPTION_H + PAD) + PAD``, ``W = (1 + top_k) (T + PAD) + PAD``.

    ``images``: ``B x 3 x S x S`` in [0, 1]; ``probs``: ``B x C``; ``maps``: ``B x C x h x w``
    (any grid that divides ``S``, upsampled bilinearly); ``labels``: ``B x C`` multi-hot or ``None``.
    """
    if len(classes) != probs.shape[1]:
        raise ValueError(f"{len(classes)} class names for {probs.shape[1]} classes")
    top_k = min(top_k, probs.shape[1])
    big = enlarge(images.float().cpu(), scale)
    size = big.shape[-2:]
    top = probs.topk(top_k, dim=1).indices.cpu()  # B x k, most probable first
    tiles, captions = [], []
    for i in range(images.shape[0]):
        heat = maps[i, top[i]].float().cpu().unsqueeze(1)  # k x 1 x h x w
        heat = torch.nn.functional.interpolate(heat, size=size, mode="bilinear", align_corners=False)[:, 0]
        tiles.append(torch.cat([big[i : i + 1], overlay(big[i].expand(top_k, -1, -1, -1), heat)]))
        truth = [] if labels is None else [classes[c] for c in labels[i].nonzero().flatten().tolist()]
        row = [(", ".join(truth) if labels is not None else f"image {i}", INK)]
        for c in top[i].tolist():
            rgb = INK if labels is None else (GOOD if labels[i, c] > 0 else BAD)
            row.append((f"{classes[c]} {float(probs[i, c]):.2f}", rgb))
        captions.append(row)
    return tile_grid(torch.stack(tiles), captions=captions)


def attention_picture(
    model,
    images: torch.Tensor,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    labels: torch.Tensor | None = None,
    top_k: int = 3,
    scale: int = 1,
    teacher: bool = False,
) -> torch.Tensor:
    """:func:`attention_grid` of ``model``'s predictions on normalised ``images``."""
    probs, maps = label_attention(model, images, teacher)
    return attention_grid(denormalize(images.float(), mean, std), probs, maps, classes, labels, top_k, scale)
