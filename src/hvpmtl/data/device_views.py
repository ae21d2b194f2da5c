"""Views made on the device (``data.augment_on=device``): workers crop, the device does the rest.

The worker half, :class:`TwoViewCrops`, draws the random numbers :class:`TwoViewTransform` draws,
in the same order and under the same seed of ``(seed, epoch, index)``, but applies only the
random resized crop: each view is a *recipe*, the uint8 crop plus the parameters of the steps
left (flip, rotation angle, colour-jitter switch, order and factors, RandAugment ops and
magnitudes). :class:`DeviceViews` applies those steps to a whole batch at once, each image with
its own parameters (:mod:`hvpmtl.data.device_ops`), then scales to float and normalises. A
sample gets the views the CPU path gives it, up to float rounding (tests/data/test_device_views.py),
and the same mask; resume and N-process runs see the same batches as before.

>>> views = PretrainViews(SyntheticScenes(8, 64), TwoViewCrops(64, 16))  # TwoViewTransform's arguments
>>> batch = collate_pretrain([views[i] for i in range(8)])  # in the workers: uint8 crops, parameters
>>> batch = DeviceViews(views.transform)(batch, "cuda")     # views: 2 x (8 x 3 x 64 x 64) float
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from hvpmtl.data import device_ops as ops
from hvpmtl.data.views import RandAugment, TwoViewTransform

JITTER_OPS = (ops.brightness, ops.contrast, ops.saturation, ops.hue)  # ColorJitter's fn_idx order


class TwoViewCrops(TwoViewTransform):
    """uint8 image -> ``(recipe0, recipe1, mask)``: the worker half of :class:`TwoViewTransform`.

    A recipe is a dict of tensors: ``crop`` (uint8 ``3 x S x S``), ``flip`` (bool), ``angle``
    (float64, degrees), ``jitter`` (bool), ``jitter_order`` (int64 ``4``: brightness 0, contrast
    1, saturation 2, hue 3, in the order applied), ``jitter_factors`` (float64 ``4``),
    ``ra_ops`` (int64 ``n``: indices into ``device_ops.RAND_AUGMENT_OPS``) and ``ra_magnitudes``
    (float64 ``n``, signed, as torchvision's RandAugment passes them to its ops). Steps that are
    off keep neutral values. Takes :class:`TwoViewTransform`'s arguments.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unknown = set(RandAugment._AUGMENTATION_SPACE) - set(ops.RAND_AUGMENT_OPS)
        if unknown:
            raise ValueError(f"data.augment_on=device: RandAugment ops {sorted(unknown)} have no batched version")
        ra = next((s for s in self.view.transforms if isinstance(s, RandAugment)), None)
        self.num_ra_ops = ra.num_ops if ra is not None else 0

    def _recipe(self, image: tv_tensors.Image) -> dict[str, torch.Tensor]:
        recipe = {
            "flip": torch.tensor(False), "angle": torch.tensor(0.0, dtype=torch.float64),
            "jitter": torch.tensor(False), "jitter_order": torch.arange(4),
            "jitter_factors": torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64),
            "ra_ops": torch.zeros(self.num_ra_ops, dtype=torch.long),
            "ra_magnitudes": torch.zeros(self.num_ra_ops, dtype=torch.float64),
        }  # fmt: skip
        crop = image
        for step in self.view.transforms:  # each step draws what its forward() draws, in order
            if isinstance(step, v2.RandomResizedCrop):
                crop = step.transform(image, step.make_params([image]))
            elif isinstance(step, v2.RandomHorizontalFlip):
                recipe["flip"] = torch.rand(1)[0] < step.p
            elif isinstance(step, v2.RandomRotation):
                recipe["angle"] = torch.tensor(step.make_params([crop])["angle"], dtype=torch.float64)
            elif isinstance(step, v2.RandomApply):
                if torch.rand(1)[0] < step.p:
                    p = step.transforms[0].make_params([crop])
                    factors = [p["brightness_factor"], p["contrast_factor"], p["saturation_factor"], p["hue_factor"]]
                    recipe["jitter"] = torch.tensor(True)
                    recipe["jitter_order"] = p["fn_idx"].clone()
                    recipe["jitter_factors"] = torch.tensor(factors, dtype=torch.float64)
            elif isinstance(step, RandAugment):
                names, magnitudes = _rand_augment_draw(step, *crop.shape[-2:])
                recipe["ra_ops"] = torch.tensor([ops.RAND_AUGMENT_OPS.index(n) for n in names], dtype=torch.long)
                recipe["ra_magnitudes"] = torch.tensor(magnitudes, dtype=torch.float64)
            elif not isinstance(step, (v2.ToDtype, v2.Normalize)):
                raise TypeError(f"no device version of {type(step).__name__}")
        recipe["crop"] = crop.as_subclass(torch.Tensor)
        return recipe

    def __call__(self, image: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
        image = tv_tensors.Image(image)
        r0, r1 = self._recipe(image), self._recipe(image)
        return r0, r1, self.masks(1)[0]

    def __repr__(self) -> str:
        return "TwoViewCrops(crops on the workers, the rest on the device: " + super().__repr__() + ")"


def _rand_augment_draw(step: RandAugment, height: int, width: int) -> tuple[list[str], list[float]]:
    """The ops and signed magnitudes ``step.forward`` would draw, drawn the same way."""
    level = step.level
    if step.level_std > 0:
        level = min(max(level + step.level_std * float(torch.randn(())), 0.0), 10.0)
    magnitude_bin = round(level * step.LEVELS / 10)
    space = step._AUGMENTATION_SPACE
    keys = tuple(space)
    names, values = [], []
    for _ in range(step.num_ops):
        name = keys[int(torch.randint(len(keys), ()))]
        magnitudes_fn, signed = space[name]
        magnitudes = magnitudes_fn(step.num_magnitude_bins, height, width)
        value = 0.0
        if magnitudes is not None:
            value = float(magnitudes[magnitude_bin])
            if signed and torch.rand(()) <= 0.5:
                value *= -1
        if step.skips_op():  # drawn where the CPU path draws it: a skipped op is the identity
            name, value = "Identity", 0.0
        names.append(name)
        values.append(value)
    return names, values


def _apply(x: torch.Tensor, where: torch.Tensor, fn: Callable, *params: torch.Tensor) -> torch.Tensor:
    """``x[i] = fn(x[i], params[i])`` for the images ``i`` where the host bool tensor ``where`` is
    True; the indices are known on the host, so nothing waits for the device."""
    if not bool(where.any()):
        return x
    if bool(where.all()):
        return fn(x, *params)
    idx = where.nonzero().flatten()
    if x.device.type == "cuda":  # a pageable host tensor's copy would wait for the device
        idx = idx.pin_memory()
    idx = idx.to(x.device, non_blocking=True)
    out = fn(x.index_select(0, idx), *(p.index_select(0, idx) for p in params))
    return x.index_copy_(0, idx, out)


class DeviceViews:
    """Recipes (:class:`TwoViewCrops`) -> float views, batched on the batch's target device.

    Applies the steps of ``transform`` after its crop, in its order: flip, rotation (bilinear,
    fill 0), colour jitter (its four ops in each image's order), RandAugment (nearest, no fill),
    then uint8 -> float in [0, 1] and normalisation. Works on any device (CPU included).
    """

    def __init__(self, transform: TwoViewTransform):
        self.steps = [s for s in transform.view.transforms if not isinstance(s, v2.RandomResizedCrop)]
        norm = next((s for s in self.steps if isinstance(s, v2.Normalize)), None)
        self.mean = torch.tensor(norm.mean if norm else [0.0, 0.0, 0.0]).view(3, 1, 1)
        self.std = torch.tensor(norm.std if norm else [1.0, 1.0, 1.0]).view(3, 1, 1)
        self.norm_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copied once per device

    def __call__(self, batch: dict, device: torch.device | str | None = None) -> dict:
        """``batch`` from ``collate_pretrain`` with recipes (on the host, uint8 crops pinned) ->
        the same batch whose ``views`` are float ``B x 3 x S x S`` on ``device``."""
        if not isinstance(batch["views"][0], dict):
            raise TypeError("DeviceViews needs recipes (data.augment_on=device), got finished views")
        device = torch.device(device) if device is not None else batch["views"][0]["crop"].device
        return {**batch, "views": [self.view(r, device) for r in batch["views"]]}

    def view(self, recipe: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """One view of a batch: ``B`` recipes -> float ``B x 3 x S x S``."""
        host = {k: recipe[k].cpu() for k in ("flip", "jitter", "jitter_order", "ra_ops")}  # no-ops on the host
        x = recipe["crop"].to(device, non_blocking=True, copy=True)  # a copy: the ops below work in place
        on_device = lambda k: recipe[k].to(device, non_blocking=True)  # noqa: E731
        out: torch.Tensor | None = None
        for step in self.steps:
            if isinstance(step, v2.RandomHorizontalFlip):
                x = _apply(x, host["flip"], ops.hflip)
            elif isinstance(step, v2.RandomRotation):
                x = ops.rotate(x, on_device("angle"), mode="bilinear", fill_zero=True)
            elif isinstance(step, v2.RandomApply):
                factors = on_device("jitter_factors")
                for position in range(4):
                    for k, op in enumerate(JITTER_OPS):
                        chosen = host["jitter"] & (host["jitter_order"][:, position] == k)
                        x = _apply(x, chosen, op, factors[:, k])
            elif isinstance(step, RandAugment):
                magnitudes = on_device("ra_magnitudes")
                for slot in range(host["ra_ops"].shape[1]):
                    for k in host["ra_ops"][:, slot].unique().tolist():
                        name = ops.RAND_AUGMENT_OPS[k]
                        if name == "Identity":
                            continue
                        op = lambda imgs, m, name=name: ops.rand_augment_op(name, imgs, m)  # noqa: E731
                        x = _apply(x, host["ra_ops"][:, slot] == k, op, magnitudes[:, slot])
            elif isinstance(step, v2.ToDtype):
                out = x.to(torch.float32).mul_(1.0 / 255)
            elif isinstance(step, v2.Normalize):
                if device not in self.norm_on:
                    self.norm_on[device] = (self.mean.to(device), self.std.to(device))
                mean, std = self.norm_on[device]
                out = out.sub_(mean).div_(std)
            else:
                raise TypeError(f"no device version of {type(step).__name__}")
        return out if out is not None else x.to(torch.float32).mul_(1.0 / 255)
