"""The pre-trained MLC head scored as a tagger (``hvpmtl mlc-head``): the Query2Label decoder's
own predictions on held-out images, with the multi-label metrics of :mod:`hvpmtl.eval.metrics`.
No probe is trained: this measures what pre-training itself learned to tag.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hvpmtl.data.config import DataConfig
from hvpmtl.eval.metrics import multilabel_metrics
from hvpmtl.runs import Run, WeightsError, model_part


def load_pretrained_model(source: str | Path, device: str | torch.device = "cpu"):
    """The whole :class:`hvpmtl.HVPMTL` (student, heads, teacher) of a run folder, its
    ``model.safetensors`` or a checkpoint, in eval mode, with the run's config
    (:meth:`hvpmtl.runs.Run.model`). ``model.class_names`` holds the names of the MLC logits."""
    return Run(source).model(device)


def head_order(model, classes: list[str], source: str | Path) -> list[int] | None:
    """The MLC logit that scores each of the data's ``classes``, mapped by name (None: in order);
    :class:`WeightsError` when the data has other tags or, for a run that stores no names, another count."""
    from hvpmtl.engine.vocabulary import logit_order

    names, n_head = getattr(model, "class_names", None), model.mlc.cls_bias.numel()
    if not classes:
        return None
    if names is None:
        if len(classes) != n_head:
            raise WeightsError(f"{source}: the MLC head has {n_head} classes, the data {len(classes)}")
        print(f"warning: {source} stores no class names (written by an older version): its {n_head} logits are "
              "matched to the data's tags by position, which cannot be checked")  # fmt: skip
        return None
    try:
        return logit_order(names, list(classes))
    except ValueError as err:
        raise WeightsError(f"{source}: {err}") from None


@torch.no_grad()
def mlc_head_metrics(
    source: str | Path, data: DataConfig | None = None, limit: int = 0, teacher: bool = False, split: str = "val",
    device: str | torch.device = "cpu", batch_size: int = 128,
) -> dict | None:  # fmt: skip
    """Multi-label metrics (%) of the run's MLC head on the first ``limit`` images of ``split``
    (``train``, ``val`` or ``test``; ``data`` defaults to the run's data), plus ``positives``: the
    share of positive labels. ``None`` when the run trained no MLC head."""
    from hvpmtl.eval.frozen import eval_images

    model, cfg = load_pretrained_model(source, device)
    if model.mlc is None or "mlc" not in model.weights:
        return None
    data = data or cfg.data
    images = eval_images(data, cfg.backbone.img_size, split, limit)
    order = head_order(model, list(getattr(images, "classes", None) or []), source)
    backbone, head = model_part(model, "teacher" if teacher else "student", source)
    scores, labels = [], []
    for x, y in DataLoader(images, batch_size=batch_size):
        logits = head(backbone(x.to(device), None)[0])[0]
        scores.append((logits if order is None else logits[:, order]).float().sigmoid().cpu())
        labels.append(y)
    s, y = torch.cat(scores), torch.cat(labels)
    return {**multilabel_metrics(s, y), "positives": 100.0 * float(y.mean())}
