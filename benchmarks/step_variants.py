"""The models, inputs and step that ``step_cost.py`` measures, one per variant, and their FLOP count.

Variants (``VARIANTS``): ``supervised`` is the same timm backbone with its linear classifier,
BCE on the multi-hot labels, one view; ``hvp-mtl`` all four objectives; ``mlc``, ``swav``,
``mim`` each alone and ``mlc+md`` (MD reads the MLC decoder, so it does not run alone); ``no-md``;
``naive``: one backbone pass per objective. The naive variant sums the losses of
single-objective ``HVPMTL`` models (``forward`` unchanged) that share the full model's backbone,
heads and teacher: MLC reads the clean view (1 pass), SwAV both views unmasked (2 passes, as
SwAV alone), MIM the masked view (1 pass), MD the clean view again (1 pass, plus the teacher's):
5 student passes against HVP-MTL's 2.

A step is what the pre-training loop does, on fixed random inputs (no data loading): forward
under autocast, backward, gradient clipping (``optim.clip_grad``), AdamW (fused where PyTorch
has it), ``after_step()`` (EMA teacher, SwAV prototypes). Models start past SwAV's prototype
freeze (the steady state).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import hvpmtl
from hvpmtl.backbones.factory import timm_kwargs
from hvpmtl.engine.optim import build_optimizer
from hvpmtl.hvp import HVPMTL

ALL_OFF = ["tasks.mlc.weight=0", "tasks.swav.weight=0", "tasks.mim.weight=0", "tasks.distill.weight=0"]


def _only(*tasks: str) -> list[str]:
    return [o for o in ALL_OFF if o.split(".")[1] not in tasks]


# variant -> config overrides (None: built by a function of its own)
VARIANTS: dict[str, list[str] | None] = {
    "supervised": None,
    "hvp-mtl": [],
    "mlc": _only("mlc"),
    "swav": _only("swav"),
    "mim": _only("mim"),
    "mlc+md": _only("mlc", "distill"),
    "no-md": ["tasks.distill.weight=0"],
    "naive": None,
    # not run unless named: the routing alternative and the leave-one-out ablations
    "swav-clean-views": ["tasks.routing.swav_masked=false"],
    "no-mlc": ["tasks.mlc.weight=0"],
    "no-swav": ["tasks.swav.weight=0"],
    "no-mim": ["tasks.mim.weight=0"],
}
DEFAULT_VARIANTS = ["supervised", "hvp-mtl", "mlc", "swav", "mim", "mlc+md", "no-md", "naive"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
class Supervised(nn.Module):
    """The baseline: ``cfg.backbone``'s timm model with a linear classifier, BCE on multi-hot labels."""

    def __init__(self, cfg: hvpmtl.Config, num_classes: int):
        super().__init__()
        kwargs = timm_kwargs(cfg.backbone) | {"num_classes": num_classes}
        self.net = timm.create_model(cfg.backbone.name, pretrained=False, **kwargs)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.net(batch["views"][0])
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["labels"])}

    def param_groups(self, weight_decay: float) -> list[dict]:
        skip = set(self.net.no_weight_decay())
        decay = [p for n, p in self.net.named_parameters() if p.ndim >= 2 and n not in skip]
        no_decay = [p for n, p in self.net.named_parameters() if p.ndim < 2 or n in skip]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def after_step(self) -> None:
        pass

    def compile_parts(self) -> None:
        self.net.compile()


class Naive(nn.Module):
    """HVP-MTL with one backbone pass per objective: the sum of single-objective ``HVPMTL`` models
    that share the full model's backbone, heads and teacher (see the module docstring)."""

    def __init__(self, cfg: hvpmtl.Config, num_classes: int):
        super().__init__()
        self.full = hvpmtl.build(cfg, num_classes)
        self.parts: list[HVPMTL] = []  # a plain list: their modules are the full model's
        shared = {id(t) for t in self.full.state_dict(keep_vars=True).values()}
        for task in self.full.weights:  # one part per objective that is on, the others' weights 0
            tasks = copy.deepcopy(cfg.tasks)
            for other in self.full.weights:
                if other != task:
                    getattr(tasks, other).weight = 0.0
            with torch.device("meta"):  # every module is replaced by the full model's below
                part = HVPMTL(cfg.backbone, tasks, num_classes)
            for name, _ in list(part.named_children()):
                setattr(part, name, getattr(self.full, name))
            if not {id(t) for t in part.state_dict(keep_vars=True).values() if torch.is_tensor(t)} <= shared:
                raise RuntimeError(f"naive {task}: a module of HVPMTL is not shared with the full model")
            self.parts.append(part)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": sum(part(batch)["loss"] for part in self.parts)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.full.param_groups(weight_decay)

    def train(self, mode: bool = True) -> Naive:
        super().train(mode)
        for part in self.parts:
            part.train(mode)
        return self

    def after_step(self) -> None:
        self.full.after_step()
        for part in self.parts:
            part.iteration = self.full.iteration

    def compile_parts(self) -> None:
        _compile_hvp(self.full)


def _compile_hvp(model: HVPMTL) -> None:
    """What ``train.compile=true`` compiles: the student's and the teacher's backbones."""
    model.backbone.compile()
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        teacher["backbone"].compile()


def build_variant(
    preset: str | None, variant: str, num_classes: int, device: str = "cpu", overrides: Sequence[str] = ()
) -> tuple[nn.Module, hvpmtl.Config]:
    """The model of ``variant`` for ``preset`` (plus ``overrides``) on ``device``, in train mode,
    past SwAV's prototype freeze. ``device="meta"`` builds it without memory, to count FLOPs."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}' (choose from {', '.join(VARIANTS)})")
    cfg = hvpmtl.load_config(preset, [*overrides, *(VARIANTS[variant] or [])])
    with torch.device(device) if device == "meta" else contextlib.nullcontext():
        if variant == "supervised":
            model: nn.Module = Supervised(cfg, num_classes)
        elif variant == "naive":
            model = Naive(cfg, num_classes)
        else:
            model = hvpmtl.build(cfg, num_classes)
    model = model.to(device).train()
    hvps = model.parts if isinstance(model, Naive) else [m for m in model.modules() if isinstance(m, HVPMTL)]
    for m in hvps:
        m.iteration = cfg.tasks.swav.freeze_prototypes_iters
    if isinstance(model, Naive):
        model.full.iteration = cfg.tasks.swav.freeze_prototypes_iters
    return model, cfg


def make_batch(cfg: hvpmtl.Config, batch_size: int, num_classes: int, device: str, seed: int = 0) -> dict:
    """Random inputs of the loop's batch layout: two views, a SimMIM mask, multi-hot labels."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.backbone.img_size
    mask = hvpmtl.mask_generator(cfg)(batch_size)
    return {
        "views": [torch.randn(batch_size, 3, s, s, generator=g).to(device) for _ in range(2)],
        "mask": mask.to(device),
        "labels": (torch.rand(batch_size, num_classes, generator=g) > 0.8).float().to(device),
    }


class TrainStep:
    """One training step as the loop takes it (forward, backward, clip, AdamW, ``after_step``) on
    a fixed batch; :meth:`state_bytes` is what it holds between steps."""

    def __init__(self, model: nn.Module, cfg: hvpmtl.Config, batch: dict, device: str, precision: str):
        self.model, self.batch, self.device, self.clip = model, batch, device, cfg.optim.clip_grad
        self.optimizer = build_optimizer(model, cfg.optim, torch.device(device))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.amp = DTYPES[precision] if precision != "fp32" else None

    def __call__(self) -> None:
        with torch.autocast(device_type=self.device, dtype=self.amp, enabled=self.amp is not None):
            loss = self.model(self.batch)["loss"]
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_step()

    def state_bytes(self) -> int:
        """Bytes of the weights and buffers (teacher included), optimiser state and inputs."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.batch["views"], self.batch["mask"],
                   self.batch["labels"]]  # fmt: skip
        tensors += [t for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def make_step(model: nn.Module, cfg: hvpmtl.Config, batch: dict, device: str, precision: str) -> TrainStep:
    """The :class:`TrainStep` of ``model`` on ``batch``."""
    return TrainStep(model, cfg, batch, device, precision)


# ----------------------------------------------------------------------------------------------
def _cpu_attention(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# CPU's fused attention kernels are missing from flop_counter's registry (PyTorch 2.x): count them
# with its own formulas
CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(model: nn.Module, batch: dict) -> int:
    """FLOPs of one forward + backward of ``model`` on ``batch`` (gradients cleared after); the
    count does not depend on the precision, so the model runs as it is, meta device included."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        model(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def compile_model(model: nn.Module, scope: str = "backbone") -> None:
    """Compile as the loop does: ``scope="backbone"`` (``train.compile=backbone``) the backbones,
    not the heads; ``scope="model"`` (``train.compile=model``) the whole forward, heads and losses
    included (``HVPMTL.compile_forward``; the naive variant compiles each part's)."""
    if scope == "model":
        hvps = model.parts if isinstance(model, Naive) else [model] if isinstance(model, HVPMTL) else []
        for part in hvps:
            part.compile_forward()
        if not hvps:
            model.compile()
    elif isinstance(model, HVPMTL):
        _compile_hvp(model)
    else:
        model.compile_parts()
