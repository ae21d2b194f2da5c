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
from hvpmtl.eval.weights import WeightsError, check_tensors, metadata_json


def load_pretrained_model(source: str | Path, device: str | torch.device = "cpu"):
    """The whole :class:`hvpmtl.HVPMTL` (student, heads, teacher) of a run folder, its
    ``model.safetensors`` or a checkpoint, in eval mode, with the run's config. ``model.class_names``
    holds the names of the MLC logits (None for files written before names were stored)."""
    from hvpmtl.config import Config, from_dict
    from hvpmtl.engine.checkpoint import find_latest, load_checkpoint
    from hvpmtl.hvp import HVPMTL

    path = Path(source)
    if not path.exists():
        raise WeightsError(f"{path}: no such run folder or weights file")
    if path.is_dir():
        path = path / "model.safetensors" if (path / "model.safetensors").is_file() else find_latest(path)
        if path is None:
            raise WeightsError(f"{source}: no model.safetensors and no checkpoint: not an hvpmtl run folder")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "hvpmtl":
            raise WeightsError(f"{path}: not an hvpmtl model.safetensors (the MLC head needs the whole model)")
        state, config = load_file(str(path)), metadata_json(meta, "config", path)
        names = _stored_names(meta["class_names"], path) if "class_names" in meta else None
    else:
        ckpt = load_checkpoint(path)
        state, config, names = ckpt["model"], ckpt["config"], ckpt.get("class_names")
    cfg = from_dict(Config, config)
    model = HVPMTL(cfg.backbone, cfg.tasks, cfg.data.num_classes)
    check_tensors(state, model.state_dict(), str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: weights do not fit the run's model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.class_names = list(names) if names is not None else None
    return model.to(device).eval(), cfg


def _stored_names(text: str, path: Path) -> list[str]:
    """The ``class_names`` metadata of a model.safetensors: a JSON list of names, else :class:`WeightsError`."""
    import json

    try:
        names = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: metadata 'class_names' is not valid JSON ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WeightsError(f"{path}: metadata 'class_names' is not a JSON list of names")
    return names


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
    device: str | torch.device = "cpu",
) -> dict | None:  # fmt: skip
    """Multi-label metrics (%) of the run's MLC head on the first ``limit`` images of ``split``
    (``data`` defaults to the run's data), plus ``positives``: the share of positive labels (the
    mAP of a random scorer). ``None`` when the run trained no MLC head."""
    from hvpmtl.eval.frozen import eval_images

    model, cfg = load_pretrained_model(source, device)
    if model.mlc is None or "mlc" not in model.weights:
        return None
    data = data or cfg.data
    images = eval_images(data, cfg.backbone.img_size, split, limit)
    order = head_order(model, list(getattr(images, "classes", None) or []), source)
    if teacher and model.teacher is None:
        raise WeightsError(f"{source}: no teacher (momentum distillation was off)")
    backbone, head = (model.teacher["backbone"], model.teacher["mlc"]) if teacher else (model.backbone, model.mlc)
    scores, labels = [], []
    for x, y in DataLoader(images, batch_size=128):
        logits = head(backbone(x.to(device), None)[0])[0]
        scores.append((logits if order is None else logits[:, order]).float().sigmoid().cpu())
        labels.append(y)
    s, y = torch.cat(scores), torch.cat(labels)
    return {**multilabel_metrics(s, y), "positives": 100.0 * float(y.mean())}
