"""hvpmtl: HVP-MTL pre-training (multi-label classification + SwAV + SimMIM + momentum
distillation on one timm ViT or Swin backbone).

Researchers with their own loop::

    import hvpmtl
    cfg = hvpmtl.load_config("cpu-tiny")
    model = hvpmtl.build(cfg, num_classes=10)
    out = model(batch)            # {"loss", "loss_mlc", "loss_swav", "loss_mim", "loss_distill", ...}
    out["loss"].backward(); model.before_step(); optimizer.step(); optimizer.zero_grad()
    model.after_step()            # EMA teacher, prototype re-normalisation; after every optimiser step
"""

from __future__ import annotations

from hvpmtl.backbones import load_start_weights
from hvpmtl.config import Config, ConfigError, load_config, save_config
from hvpmtl.data.masking import MaskGenerator
from hvpmtl.hvp import HVPMTL

__version__ = "0.1.0"
__all__ = [
    "HVPMTL",
    "Config",
    "ConfigError",
    "MaskGenerator",
    "build",
    "embed",
    "load_backbone",
    "load_config",
    "mask_generator",
    "save_config",
]


def build(cfg: Config, num_classes: int | None = None, init_weights: bool = True) -> HVPMTL:
    """The model a config describes; ``num_classes`` defaults to ``cfg.data.num_classes``.

    With ``init_weights`` the backbone starts from ``backbone.pretrained``, ``pretrained_file`` or
    ``init_from`` when one is set, and the EMA teacher from a copy of it; pass ``False`` when other
    weights are loaded next (resuming a checkpoint)."""
    model = HVPMTL(cfg.backbone, cfg.tasks, num_classes if num_classes is not None else cfg.data.num_classes)
    loaded = init_weights and load_start_weights(model.backbone, cfg.backbone, read_run=_run_backbone) is not None
    if loaded and model.teacher is not None:
        model.teacher["backbone"].load_state_dict(model.backbone.state_dict())
    return model


def _run_backbone(source: str, part: str):
    """``backbone.init_from``: a previous run's backbone (run folders are read by :mod:`hvpmtl.runs`)."""
    from hvpmtl.runs import Run

    return Run(source).start_weights(part)


def load_backbone(run, part: str = "student"):
    """The timm model of a run's ``part`` (``"student"`` or ``"teacher"``) in eval mode, weights
    loaded; ``run`` is a run folder, checkpoint or ``.safetensors`` file. Its ``pretrained_cfg``
    holds the run's preprocessing, so ``timm.data.resolve_model_data_config(model)`` gives the
    run's input size, mean, std, crop and interpolation::

        model = hvpmtl.load_backbone("runs/cpu-tiny")
        transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
        features = model.forward_features(transform(image)[None])
    """
    from hvpmtl.runs import Run

    return Run(run).timm_model(part)


def embed(run, data, **kwargs):
    """One feature vector per image of ``data`` (an image folder, a ``.csv``/``.jsonl`` manifest,
    or a data config of any source) under ``run``'s backbone, with the run's preprocessing; see
    :func:`hvpmtl.eval.embed.embed` for the options (``part``, ``feature``, ``batch_size``, ...)::

        emb = hvpmtl.embed("runs/cpu-tiny", "photos/")
        emb.features      # N x D float32, in the order of emb.paths
        emb.save("photos.safetensors")
    """
    from hvpmtl.eval.embed import embed as embed_images

    return embed_images(run, data, **kwargs)


def mask_generator(cfg: Config) -> MaskGenerator:
    """The SimMIM mask generator matching ``cfg`` (image size, mask unit, ratio)."""
    return MaskGenerator(cfg.backbone.img_size, cfg.tasks.mim.mask_patch_size, cfg.tasks.mim.mask_ratio)
