"""Objectives as plug-ins: the :class:`Objective` base class, its registry, and the ``tasks``
config block that follows the registry.

An objective is one file: a config dataclass with a ``weight``, and an :class:`Objective` that
builds its head(s), names the backbone inputs it reads and computes its loss, registered with
:func:`register_objective`. Registering it adds ``tasks.<name>`` to :class:`TasksConfig` (YAML,
``key=value`` overrides and their checks included); :class:`hvpmtl.hvp.HVPMTL` builds every
registered objective whose weight is > 0, runs the one batched backbone call over the inputs they
read, and returns ``loss_<name>`` and ``weight * loss`` in ``loss``.

>>> @dataclass
... class ToyConfig:
...     weight: float = 1.0
>>> @register_objective("toy", ToyConfig)
... class Toy(Objective):
...     modules = ("toy",)  # -> model.toy, state-dict prefix "toy."
...     def build(self, model, num_classes):
...         return {"toy": nn.Linear(model.backbone.num_features, 3)}
...     def inputs(self, plan):
...         return {"toy": (plan.clean_view, False)}  # the clean view's features
...     def forward(self, model, step, with_loss):
...         images, _ = step.pixels("toy")
...         return {"loss": F.mse_loss(model.toy(step.pooled("toy")), images.mean((2, 3)))}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

Key = tuple[int, bool]  # (view index, encoded under the SimMIM mask?)


@dataclass
class RoutingConfig:
    """Which augmented view feeds which task (SPEC: two views, one of them patch-masked).

    With the defaults the student runs exactly two backbone passes per image: the masked view
    serves MIM and its SwAV prediction, the clean view serves MLC, its SwAV prediction and MD.
    """

    masked_view: int = 0  # index (0 or 1) of the view that receives the SimMIM mask
    mlc_masked: bool = False  # MLC/MD read the masked view instead of the clean one
    swav_masked: bool = True  # SwAV's prediction for the masked view reuses the masked pass
    # (False: SwAV sees both views unmasked, which costs a third backbone pass when MIM is on)


@dataclass(frozen=True)
class ViewPlan:
    """What :meth:`Objective.inputs` chooses from: the two views and whether any built objective
    reads masked pixels (then the masked view can be encoded under the mask)."""

    masked_view: int
    clean_view: int
    masking: bool
    routing: RoutingConfig


@dataclass
class Step:
    """One forward pass as the objectives see it.

    ``features[key]`` is the student's ``(fmap B x d0 x h x w, pooled B x d0)`` for each distinct
    ``(view, masked?)`` pair; ``inputs`` maps each objective's input names to those pairs.
    ``phases[name]`` is what objective ``name``'s :meth:`Objective.phase` gave for this step.
    ``shared[name]`` holds what objective ``name`` leaves for the objectives that require it.
    """

    views: list[torch.Tensor]
    mask: torch.Tensor | None
    labels: torch.Tensor | None
    inputs: dict[str, Key]
    features: dict[Key, tuple[torch.Tensor, torch.Tensor]]
    phases: dict[str, dict[str, Any]]
    shared: dict[str, Any] = field(default_factory=dict)
    # which tags are known (bool, B x 1 per image or B x C per element; None: all), and the global
    # batch's known counts per shard (hvpmtl.objectives.mlc.known_counts; None: this batch's own)
    known: torch.Tensor | None = None
    known_counts: torch.Tensor | None = None

    def fmap(self, name: str) -> torch.Tensor:
        return self.features[self.inputs[name]][0]

    def pooled(self, name: str) -> torch.Tensor:
        return self.features[self.inputs[name]][1]

    def pixels(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The images input ``name`` was encoded from and the mask they were encoded under (or None)."""
        view, masked = self.inputs[name]
        return self.views[view], (self.mask if masked else None)


class Objective:
    """One pre-training objective; subclass it and register it with :func:`register_objective`.

    Objectives hold their config only: their modules live on the model (``model.<module>``, so
    state-dict keys read ``<module>.*``) and are looked up there at every call.
    """

    name: ClassVar[str] = ""  # set by register_objective: config block tasks.<name>, loss key loss_<name>
    config_cls: ClassVar[type] = object
    modules: ClassVar[tuple[str, ...]] = ()  # model attributes build() returns (None while the objective is off)
    requires: ClassVar[tuple[str, ...]] = ()  # objectives whose modules and step.shared output this one reads;
    # they are built (even at weight 0) and run before it
    masks_pixels: ClassVar[bool] = False  # reads masked pixels (MIM): the masked view is encoded under the mask
    reads_labels: ClassVar[bool] = False  # needs the images' tags: a data set without any tag cannot train it
    logged: ClassVar[tuple[str, ...]] = ()  # forward() extras the training loop logs beside loss_<name>

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build(self, model: nn.Module, num_classes: int | None) -> dict[str, nn.Module]:
        """The modules named in ``modules``; ``model.backbone`` and the modules of ``requires`` exist."""
        return {}

    def inputs(self, plan: ViewPlan) -> dict[str, Key]:
        """Student backbone inputs read, ``name -> (view index, masked?)``; names are global, so
        prefix them with the objective's name. Equal pairs share one backbone pass."""
        return {}

    def phase(self, model: nn.Module, iteration: int) -> dict[str, Any]:
        """The Python values this step's :meth:`forward` branches on (``step.phases[name]``), read
        before the forward: e.g. whether SwAV's prototypes are still frozen at ``iteration``.
        Derive such switches here, not from counters inside :meth:`forward`: a compiled forward
        (``train.compile=model``) is specialised on these values, so it recompiles only when one
        of them changes, not at every step."""
        return {}

    def forward(self, model: nn.Module, step: Step, with_loss: bool) -> dict[str, torch.Tensor]:
        """``{"loss": unweighted loss, **extras}`` (extras go into the model's output as they are);
        ``with_loss`` is False when the objective runs only for those that require it. Keep it to
        tensor work: host-side state it changes belongs in :meth:`after_forward`."""
        raise NotImplementedError

    def after_forward(self, model: nn.Module, batch: dict) -> None:
        """Called after every forward, outside a compiled forward: host-side bookkeeping of what
        the forward did (SwAV's count of queued rows)."""

    def before_step(self, model: nn.Module) -> None:
        """Called after the backward pass(es), before gradient clipping and the optimiser step:
        drop gradients the step must not use (SwAV's frozen prototypes)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (EMA updates, re-normalisations)."""

    @property
    def sums_over_images(self) -> bool:
        """True when the loss is a sum over images (the engine then rescales it across ranks)."""
        return False

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Checks across config blocks, on the root config; raise ValueError naming the key."""


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str, config_cls: type):
    """Class decorator: register an :class:`Objective` as ``tasks.<name>`` with config ``config_cls``
    (a dataclass with a ``weight`` field). ``requires`` must name objectives registered before it."""

    def register(cls: type[Objective]) -> type[Objective]:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"register_objective({name!r}): {cls!r} is not an Objective subclass")
        if not name.isidentifier() or name == "routing":
            raise ValueError(f"register_objective({name!r}): the name must be an identifier other than 'routing'")
        if not dataclasses.is_dataclass(config_cls) or "weight" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise TypeError(f"register_objective({name!r}): {config_cls!r} must be a dataclass with a 'weight' field")
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"objective {name!r} is registered already (by {old.__module__}.{old.__qualname__})")
        missing = [r for r in cls.requires if r not in _REGISTRY or r == name]
        if missing:
            raise ValueError(f"objective {name!r} requires {missing}: register those first")
        taken = {m: o for o, c in _REGISTRY.items() if o != name for m in c.modules}
        clash = [m for m in cls.modules if m in taken or m == "backbone"]
        if clash:
            raise ValueError(f"objective {name!r}: module name(s) {clash} are used already")
        cls.name, cls.config_cls = name, config_cls
        _REGISTRY[name] = cls
        _refresh_tasks_config()
        return cls

    return register


def unregister_objective(name: str) -> None:
    """Remove a registered objective and its ``tasks.<name>`` block (for tests)."""
    users = [o for o, c in _REGISTRY.items() if name in c.requires]
    if users:
        raise ValueError(f"objective {name!r} is required by {users}")
    _REGISTRY.pop(name, None)
    _refresh_tasks_config()


def objective_types() -> dict[str, type[Objective]]:
    """The registered objectives, ``name -> class``, in registration order."""
    return dict(_REGISTRY)


class TasksConfig:
    """The ``tasks`` block: one config block per registered objective (``tasks.<name>``, in
    registration order), then ``routing``. A task whose ``weight`` is 0 is not built and costs no
    compute. A dataclass whose fields follow the registry (see :func:`register_objective`)."""

    def __getattr__(self, name: str) -> Any:
        # an instance made before its objective was registered reads that block's defaults
        cls = _REGISTRY.get(name)
        if cls is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        block = cls.config_cls()
        setattr(self, name, block)
        return block

    def label_readers(self) -> list[str]:
        """``tasks.<name>`` of each objective that reads tags (:attr:`Objective.reads_labels`) and is on
        (weight > 0), in registration order: what a data set without tags cannot train."""
        return [f"tasks.{n}" for n, c in _REGISTRY.items() if c.reads_labels and getattr(self, n).weight > 0]


def _refresh_tasks_config() -> None:
    """Give :class:`TasksConfig` (the same class object) the dataclass fields of the registry."""
    spec = [(n, c.config_cls, field(default_factory=c.config_cls)) for n, c in _REGISTRY.items()]
    spec.append(("routing", RoutingConfig, field(default_factory=RoutingConfig)))
    made = dataclasses.make_dataclass("TasksConfig", spec)
    for attr in ("__dataclass_fields__", "__dataclass_params__", "__annotations__", "__init__", "__repr__", "__eq__",
                 "__hash__", "__match_args__"):  # fmt: skip
        if attr in made.__dict__:
            setattr(TasksConfig, attr, made.__dict__[attr])


_refresh_tasks_config()
