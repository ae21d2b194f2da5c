"""The held-out images pictures are made of, and pictures during pre-training.

Both ``hvpmtl visualize`` and the training loop show the first ``count`` images of a held-out
split of the run's own data (``val``), through the evaluation transform, with SimMIM masks drawn
from a fixed seed: the same images under the same masks at every step, so pictures of one run
compare across steps.

With ``train.pictures_every=N`` (0 = off) rank 0 writes ``<run>/pictures/recon_step_<step>.png``
and ``attention_step_<step>.png`` every ``N`` steps and at the last step, and logs them to
TensorBoard (``pictures/recon``, ``pictures/attention``). The model is in eval mode for them and
the global RNG is left as it was, so pictures do not change the training run. Off under FSDP
(its forward is collective).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hvpmtl.data import EvalImages, EvalTransform, MaskGenerator, build_dataset
from hvpmtl.viz.attention import attention_picture
from hvpmtl.viz.grid import auto_scale, save_png
from hvpmtl.viz.recon import recon_grid


@dataclass
class PictureSet:
    """Held-out images, their labels and fixed masks.

    Attributes:
        images: ``B x 3 x S x S`` normalised as the model reads them.
        labels: ``B x C`` multi-hot (clean labels).
        mask: ``B x g x g`` SimMIM masks (True = masked) at mask-unit granularity.
        classes: the ``C`` label names.
        mean, std: the normalisation (``data.mean`` / ``data.std``), to undo it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to(self, device: torch.device | str) -> PictureSet:
        self.images, self.mask = self.images.to(device), self.mask.to(device)
        return self


def picture_set(cfg, count: int = 8, split: str = "val", seed: int = 0) -> PictureSet:
    """The first ``count`` images of ``split`` of the data of ``cfg`` (an :class:`hvpmtl.Config`),
    with masks drawn from ``seed``. Raises ``ValueError`` / ``FileNotFoundError`` when the split
    cannot be read (e.g. a manifest without ``data.val_manifest``)."""
    if count < 1:
        raise ValueError(f"count={count}: must be >= 1")
    size, d = cfg.backbone.img_size, cfg.data
    # as hvpmtl.eval.frozen.eval_images (clean labels, evaluation transform), keeping the class names
    data = EvalImages(build_dataset(replace(d, label_noise=0.0), size, split), EvalTransform(size, d.eval_crop_pct,
                      d.mean, d.std))  # fmt: skip
    if len(data) == 0:
        raise ValueError(f"data split '{split}' holds no images")
    images, labels = map(torch.stack, zip(*(data[i] for i in range(min(count, len(data))))))
    mim = cfg.tasks.mim
    mask = MaskGenerator(size, mim.mask_patch_size, mim.mask_ratio)(len(images), torch.Generator().manual_seed(seed))
    classes = list(data.classes or [str(c) for c in range(labels.shape[1])])
    return PictureSet(images, labels, mask, classes, tuple(cfg.data.mean), tuple(cfg.data.std))


def make_pictures(
    model, pics: PictureSet, scale: int = 0, top_k: int = 3, teacher: bool = False,
    kinds: tuple[str, ...] = ("recon", "attention"),
) -> dict:  # fmt: skip
    """``{"recon": picture, "attention": picture}`` (uint8 ``3 x H x W``) of ``kinds``, for the heads
    ``model`` has (MIM for ``recon``, MLC for ``attention``); ``scale`` 0 enlarges images to ~128 px."""
    scale = scale or auto_scale(pics.images.shape[-1])
    out = {}
    if "recon" in kinds and model.mim is not None:
        out["recon"] = recon_grid(model, pics.images, pics.mask, pics.mean, pics.std, scale)
    if "attention" in kinds and model.mlc is not None:
        out["attention"] = attention_picture(model, pics.images, pics.classes, pics.mean, pics.std, pics.labels,
                                             top_k, scale, teacher)  # fmt: skip
    return out


class TrainingPictures:
    """Called by the training loop with the unwrapped model at the steps ``train.pictures_every`` names."""

    def __init__(self, pics: PictureSet, run_dir: str | Path, tb=None):
        self.pics, self.folder, self.tb = pics, Path(run_dir) / "pictures", tb

    @torch.no_grad()
    def __call__(self, model, step: int) -> dict[str, Path]:
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[self.pics.images.device] if self.pics.images.is_cuda else []):
                pictures = make_pictures(model, self.pics)
        finally:
            model.train(was_training)
        paths = {}
        for kind, picture in pictures.items():
            paths[kind] = save_png(picture, self.folder / f"{kind}_step_{step:08d}.png")
            if self.tb is not None:
                self.tb.add_image(f"pictures/{kind}", picture, step)
        return paths


def training_pictures(cfg, env, run_dir: str | Path, tb, total_steps: int, fsdp: bool) -> TrainingPictures | None:
    """The loop's picture maker, or ``None`` when ``train.pictures_every`` is 0 or longer than the
    run, on ranks other than 0, under FSDP, or when the held-out split cannot be read (a warning)."""
    t = cfg.train
    if not 0 < t.pictures_every <= total_steps or not env.is_main:
        return None
    if fsdp:
        print("warning: train.pictures_every: no pictures under FSDP (its forward is collective)")
        return None
    try:
        pics = picture_set(cfg, t.pictures_count, "val", t.seed).to(env.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"warning: train.pictures_every={t.pictures_every}: pictures off ({err})")
        return None
    return TrainingPictures(pics, run_dir, tb)
