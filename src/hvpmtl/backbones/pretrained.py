"""Where a new run's backbone weights start: timm's pretrained weights from the local cache
(``backbone.pretrained``), a local timm state dict (``backbone.pretrained_file``), or the student
or teacher backbone of a previous hvpmtl run (``backbone.init_from`` + ``init_from_part``).

Nothing is ever downloaded: ``pretrained`` looks for the file timm would load in the Hugging Face
cache (then torch hub's) and stops, naming the cache, when it is not there. Files are read safely
(safetensors, or ``torch.load(weights_only=True)``) and adapted by the timm family's own
``checkpoint_filter_fn`` (position embeddings resampled to another image size, patch embeddings to
another patch size, Swin bias tables to another window), then must fit the backbone exactly:
missing, unexpected and mis-shaped keys are listed. Only the timm model's weights are loaded; the
adapter's SimMIM mask token and the task heads start from their initialisation.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlparse

import torch
from torch import nn

from hvpmtl.config_io import ConfigError

if TYPE_CHECKING:
    from hvpmtl.backbones import BackboneConfig
    from hvpmtl.backbones.base import MaskedBackbone

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
PARTS = ("student", "teacher")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in its order


class StartWeights(NamedTuple):
    """A previous run's backbone as a new run's start, read above this package (:mod:`hvpmtl.runs`)."""

    state: dict[str, torch.Tensor]  # timm keys
    label: str  # how logs name it, e.g. "prev teacher step 300"
    name: str  # the timm name of the backbone it belongs to


def _error(message: str) -> ValueError:
    return ConfigError(message)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def pretrained_cfg(name: str):
    """timm's ``PretrainedCfg`` of ``name`` (a tag picks other weights), or ``None`` when timm has no
    pretrained weights for it."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a tag the architecture does not have
        return None
    return cfg if cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file) else None


def cached_pretrained_file(name: str, key: str = "backbone.pretrained") -> Path:
    """The local file of timm's default pretrained weights for model ``name`` (tags such as
    ``vit_base_patch16_224.augreg_in21k`` pick other weights); raises naming ``key`` and the cache
    folders when the weights were never downloaded. Never touches the network."""
    cfg = pretrained_cfg(name)
    if cfg is None:
        raise _error(f"{key}=true: timm has no pretrained weights for '{name}'")
    looked = []
    if cfg.file:
        if Path(cfg.file).is_file():
            return Path(cfg.file)
        looked.append(str(cfg.file))
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        cache = hub_cache_dir()
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
        if cfg.hf_hub_filename and cfg.hf_hub_filename.endswith(".bin"):
            names = (cfg.hf_hub_filename[:-4] + ".safetensors", *names)
        for filename in names:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"{cache} (Hugging Face repo {repo}: {' or '.join(names)})")
    if cfg.url and not cfg.custom_load:  # custom_load urls are .npz files only timm's own loader reads
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
        looked.append(str(path))
    raise _error(
        f"{key}=true: timm's weights for '{name}' are not in the local cache; looked in {'; '.join(looked)}. "
        f"hvpmtl never downloads: fetch them once where there is a network (python -c \"import timm; "
        f"timm.create_model('{name}', pretrained=True)\") or set backbone.pretrained_file to a local file"
    )


def read_state_file(path: str | Path, key: str = "backbone.pretrained_file") -> dict[str, torch.Tensor]:
    """A timm state dict from ``path`` (.safetensors, or .pth/.pt/.bin read with ``weights_only=True``);
    a training checkpoint's EMA, ``state_dict`` or ``model`` entry is taken as timm's loader does."""
    from timm.models import clean_state_dict

    path = Path(path)
    if not path.is_file():
        raise _error(f"{key}: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise _error(f"{key}: {path}: not a readable safetensors file ({err})") from None
        if meta.get("format") == "hvpmtl":
            raise _error(f"{key}: {path} is an hvpmtl model file; start from it with backbone.init_from")
    elif path.suffix in SUFFIXES:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols and asks for bug reports
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never do that
            raise _error(
                f"{key}: {path}: not a weights file, or unsafe to load (it holds arbitrary pickled objects); "
                "nothing was loaded; save its state dict alone or as .safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise _error(f"{key}: {path}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    else:
        raise _error(f"{key}: {path}: expected one of {', '.join(SUFFIXES)}")
    if isinstance(state, dict):
        for entry in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(entry), dict):
                state = state[entry]
                break
    tensors = {k: v for k, v in clean_state_dict(state).items() if isinstance(v, torch.Tensor)} if state else {}
    if not tensors:
        raise _error(f"{key}: {path}: holds no tensors (not a state dict)")
    if any(k.startswith("backbone.model.") for k in tensors):
        raise _error(f"{key}: {path} is an hvpmtl checkpoint; start from it with backbone.init_from")
    return tensors


def describe_mismatch(own: dict, state: dict, allow_missing: tuple[str, ...] = ()) -> str | None:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` (missing and
    unexpected keys, other shapes; four of each named), or ``None`` when it fits."""
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]  # fmt: skip
    found = (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes))
    parts = [f"{len(items)} {name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
             for name, items in found if items]  # fmt: skip
    return "; ".join(parts) or None


def adapt_state(state: dict[str, torch.Tensor], model: nn.Module, filter_fn=None) -> dict[str, torch.Tensor]:
    """``state`` after the family's ``filter_fn(state, model)`` (timm's conversions and resizing),
    less classifier weights the headless ``model`` has no place for."""
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {k: v for k, v in state.items() if k in own or not k.startswith(tuple(f"{h}." for h in heads))}


def load_timm_state(backbone: MaskedBackbone, state: dict[str, torch.Tensor], where: str, name: str) -> None:
    """Adapt ``state`` to ``backbone.model`` and load it; a state that does not fit raises naming ``where``."""
    model = backbone.model
    state = adapt_state(state, model, type(backbone).checkpoint_filter)
    problem = describe_mismatch(model.state_dict(), state)
    if problem is not None:
        raise _error(f"{where} does not fit {name} ({problem})")
    model.load_state_dict(state)


def start_source(cfg: BackboneConfig) -> str | None:
    """How the config's start reads in logs (``None``: random initialisation)."""
    if cfg.pretrained:
        return f"timm's pretrained weights for {cfg.name}"
    if cfg.pretrained_file:
        return str(cfg.pretrained_file)
    if cfg.init_from:
        return f"{cfg.init_from} ({cfg.init_from_part})"
    return None


def load_start_weights(
    backbone: MaskedBackbone,
    cfg: BackboneConfig,
    prefix: str = "backbone",
    read_run: Callable[[str, str], StartWeights] | None = None,
) -> str | None:
    """Load the weights ``cfg`` starts from into ``backbone`` (in place) and say where they came
    from; ``None`` (nothing loaded) for a random initialisation. ``read_run(init_from, part)``
    reads a previous run's backbone (``hvpmtl.build`` passes :meth:`hvpmtl.runs.Run.start_weights`;
    run folders are read above this package); its ``ValueError`` is reported under the key."""
    if cfg.pretrained:
        key = _key(prefix, "pretrained")
        path = cached_pretrained_file(cfg.name, key)
        load_timm_state(backbone, read_state_file(path, key), f"{key}=true: {path}", cfg.name)
        return f"{start_source(cfg)} ({path})"
    if cfg.pretrained_file:
        key = _key(prefix, "pretrained_file")
        load_timm_state(backbone, read_state_file(cfg.pretrained_file, key), f"{key}={cfg.pretrained_file}", cfg.name)
        return start_source(cfg)
    if cfg.init_from:
        key = _key(prefix, "init_from")
        if read_run is None:
            raise _error(f"{key}: no reader of run folders given (build the model with hvpmtl.build)")
        try:
            weights = read_run(cfg.init_from, cfg.init_from_part)
        except ValueError as err:  # the run's files: unreadable, or no such part
            raise _error(f"{key}: {err}") from None
        where = f"{key}={cfg.init_from} ({weights.label}, a {weights.name})"
        load_timm_state(backbone, weights.state, where, cfg.name)
        return weights.label
    return None
