"""Checkpoints: atomic, complete (for exact resume), loadable with ``weights_only=True``.

A checkpoint holds the model (student, teacher and the iteration counter through the extra
state), the optimiser and grad-scaler states, the loop position (step, epoch, step in epoch),
every rank's RNG states (python, numpy, torch, CUDA; as tensors and plain types) and the
resolved config. It is written to a temporary file in the same folder, fsync'ed and renamed,
so a crash never leaves a half-written checkpoint. State dicts go through
``torch.distributed.checkpoint.state_dict`` so DDP, FSDP2 and single-process runs share one
format (full, unsharded tensors keyed by parameter name).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hvpmtl.engine.distributed import DistEnv, all_gather_object, unwrap

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
FORMAT = 1


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run folder's checkpoints, oldest first."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def find_latest(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest step checkpoints (0 keeps all)."""
    if keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------
# RNG states as weights_only-safe values


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# save / load


def _options(full: bool = True, **kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=True, **kw)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    loop_state: dict,
    config: dict,
    env: DistEnv,
) -> None:
    """Collective under torchrun (every rank calls it); rank 0 writes ``path``."""
    inner = unwrap(model)
    model_sd = get_model_state_dict(inner, options=_options())
    optim_sd = get_optimizer_state_dict(inner, optimizer, options=_options())
    rngs = all_gather_object(rng_state(), env)
    if not env.is_main:
        return
    payload = {
        "format": FORMAT,
        "model": model_sd,
        "optimizer": optim_sd,
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rngs,
        "world_size": env.world_size,
        "config": config,
        **loop_state,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint on CPU (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an hvpmtl checkpoint (format {FORMAT})")
    return ckpt


def restore(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None, scaler: Any, env: DistEnv) -> None:
    """Load model, optimiser, scaler and (when the world size matches) this rank's RNG states."""
    inner = unwrap(model)
    set_model_state_dict(inner, ckpt["model"], options=_options())
    if optimizer is not None:
        # frozen SwAV prototypes have no optimiser state yet: not strict
        set_optimizer_state_dict(inner, optimizer, ckpt["optimizer"], options=_options(strict=False))
        # loading first initialises every state with a zero step; drop the states the
        # checkpoint does not have, or their first real step would get Adam's step count 2
        saved = set(ckpt["optimizer"].get("state", {}))
        for name, p in inner.named_parameters():
            if name not in saved:
                optimizer.state.pop(p, None)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng") or []
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])


# ----------------------------------------------------------------------------------------------
# exported weights


def export_weights(run_dir: str | Path, model: nn.Module, config: dict, env: DistEnv) -> dict[str, Path]:
    """Write ``model.safetensors`` (student + teacher) and ``backbone.safetensors`` (the
    student's timm backbone with timm's own keys; load with :func:`load_backbone`). Collective."""
    from safetensors.torch import save as st_save

    inner = unwrap(model)
    sd = get_model_state_dict(inner, options=_options())
    if not env.is_main:
        return {}
    run_dir = Path(run_dir)
    tensors = {k: v.detach().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    meta = {"format": "hvpmtl", "iteration": str(getattr(inner, "iteration", 0)), "config": json.dumps(config)}
    prefix = "backbone.model."
    backbone = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    bcfg = config.get("backbone", {})
    bmeta = {"format": "timm", "name": str(bcfg.get("name", "")), "backbone_config": json.dumps(bcfg)}
    paths = {"model": run_dir / "model.safetensors", "backbone": run_dir / "backbone.safetensors"}
    atomic_write(paths["model"], lambda f: f.write(st_save(tensors, metadata=meta)))
    atomic_write(paths["backbone"], lambda f: f.write(st_save(backbone, metadata=bmeta)))
    return paths


def load_backbone(path: str | Path, backbone_cfg: Any = None) -> nn.Module:
    """A :class:`~hvpmtl.backbones.MaskedBackbone` with the weights of ``backbone.safetensors``;
    the backbone config defaults to the one stored in the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hvpmtl.backbones import BackboneConfig, build_backbone
    from hvpmtl.config import from_dict

    if backbone_cfg is None:
        with safe_open(str(path), "pt") as f:
            backbone_cfg = from_dict(BackboneConfig, json.loads(f.metadata()["backbone_config"]), "backbone")
    backbone = build_backbone(backbone_cfg)
    backbone.model.load_state_dict(load_file(str(path)))
    return backbone
