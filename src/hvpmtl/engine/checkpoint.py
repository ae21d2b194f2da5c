"""Checkpoints: atomic, complete (for exact resume), loadable with ``weights_only=True``.

A checkpoint holds the model (student, teacher and the iteration counter through the extra
state), the optimiser and grad-scaler states, the loop position (step, epoch, step in epoch),
every rank's RNG states (python, numpy, torch, CUDA; as tensors and plain types) and the
resolved config. It is written to a temporary file in the same folder, fsync'ed and renamed,
so a crash never leaves a half-written checkpoint; a sidecar ``step_N.pt.sha256`` (sha256sum
format, written the same way just after it) lets :func:`load_checkpoint` refuse a truncated or
damaged file by name instead of failing deep inside ``torch.load``. State dicts go through
``torch.distributed.checkpoint.state_dict`` so DDP, FSDP2 and single-process runs share one
format (full, unsharded tensors keyed by parameter name).
"""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import random
import re
import zipfile
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

from hvpmtl.backbones.timm_config import write_timm_folders
from hvpmtl.engine.distributed import DistEnv, all_gather_object, unwrap
from hvpmtl.files import DiskFullError
from hvpmtl.files import atomic_write as _atomic_write

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
FORMAT = 1
CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (empty, damaged, foreign or unsafe); names the file."""


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
            checksum_path(path).unlink(missing_ok=True)


def atomic_write(path: str | Path, write) -> None:
    """:func:`hvpmtl.files.atomic_write`, opening through this module's ``open`` (so that a test can
    give the checkpoint writer a full disk)."""
    _atomic_write(path, write, opener=open)


# ----------------------------------------------------------------------------------------------
# checksums


def checksum_path(path: str | Path) -> Path:
    """The sidecar ``<checkpoint>.sha256`` beside a checkpoint."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksum(path: str | Path) -> Path:
    """Write ``<path>.sha256`` (``sha256sum`` format) atomically; returns its path."""
    path = Path(path)
    line = f"{_sha256(path)}  {path.name}\n"
    atomic_write(checksum_path(path), lambda f: f.write(line.encode()))
    return checksum_path(path)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a usable checkpoint file (empty, truncated, damaged), or None. Checks the
    sidecar checksum when there is one, else that the file is a complete zip archive."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    sidecar = checksum_path(path)
    if sidecar.is_file():
        expected = sidecar.read_text().split(maxsplit=1)[:1]
        if expected != [_sha256(path)]:
            return f"checksum mismatch with {sidecar.name} ({size} bytes): truncated or damaged"
        return None
    if not zipfile.is_zipfile(path):
        return f"not a complete checkpoint archive ({size} bytes): truncated, damaged or not a checkpoint"
    return None


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
    path = Path(path)
    checksum_path(path).unlink(missing_ok=True)  # a stale sidecar must never vouch for a new file
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
        write_checksum(path)
    except DiskFullError as err:
        latest = find_latest(path.parent.parent)
        kept = f"the latest complete checkpoint is {latest.name}" if latest else "no earlier checkpoint exists"
        raise DiskFullError(
            errno.ENOSPC, f"disk full (ENOSPC) while writing checkpoint {path}; {kept}: free space on that disk, "
            "then continue with train.resume=auto"
        ) from err


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint on CPU (``weights_only=True``) after checking it is complete; a file that
    is empty, damaged, foreign or needs arbitrary pickled objects raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; nothing was loaded")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never do that
        raise CheckpointError(
            f"{path}: not a checkpoint written by hvpmtl, or unsafe to load (it holds arbitrary pickled "
            "objects); nothing was loaded"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        why = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hvpmtl checkpoint (format {FORMAT})")
    return ckpt


def check_fits(saved: dict, model: nn.Module, path: str | Path, changed: list[str] = ()) -> None:
    """Raise :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys when the
    checkpoint's model state ``saved`` does not fit ``model`` (a different architecture)."""
    current = unwrap(model).state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        f"{k}: checkpoint {list(saved[k].shape)} vs model {list(v.shape)}"
        for k, v in current.items()
        if k in saved and isinstance(v, torch.Tensor) and isinstance(saved[k], torch.Tensor)
        and saved[k].shape != v.shape
    ]  # fmt: skip
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    why = f"; the config differs in {', '.join(changed)}" if changed else ""
    raise CheckpointError(
        f"{path} does not fit this model: {', '.join(parts)}{why}; resume with the config the checkpoint was "
        "written with, or start a new run in another train.output_dir"
    )


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


def export_weights(
    run_dir: str | Path, model: nn.Module, config: dict, env: DistEnv, class_names: list[str] | None = None
) -> dict[str, Path]:
    """Write ``model.safetensors`` (student + teacher; the ``class_names`` of its logits in the
    metadata), ``backbone.safetensors`` (the student's timm backbone with timm's own keys; read with
    :class:`hvpmtl.runs.Run`) and, when the run has an EMA teacher, ``teacher_backbone.safetensors``
    (the teacher's, same format), each also as a timm ``local-dir:`` folder with its preprocessing
    (``timm/``, ``timm_teacher/``; :mod:`hvpmtl.backbones.timm_config`). Collective."""
    from safetensors.torch import save as st_save

    inner = unwrap(model)
    sd = get_model_state_dict(inner, options=_options())
    if not env.is_main:
        return {}
    run_dir = Path(run_dir)
    tensors = {k: v.detach().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    meta = {"format": "hvpmtl", "iteration": str(getattr(inner, "iteration", 0)), "config": json.dumps(config)}
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    bcfg = config.get("backbone", {})
    paths = {"model": run_dir / "model.safetensors"}
    atomic_write(paths["model"], lambda f: f.write(st_save(tensors, metadata=meta)))
    parts = {"backbone": ("student", "backbone.model."), "teacher_backbone": ("teacher", "teacher.backbone.model.")}
    for name, (part, prefix) in parts.items():
        backbone = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not backbone:
            continue
        bmeta = {"format": "timm", "name": str(bcfg.get("name", "")), "backbone_config": json.dumps(bcfg),
                 "part": part, "iteration": meta["iteration"]}  # fmt: skip
        paths[name] = run_dir / f"{name}.safetensors"
        atomic_write(paths[name], lambda f, b=backbone, m=bmeta: f.write(st_save(b, metadata=m)))
    paths.update(write_timm_folders(run_dir, paths, config))  # timm/, timm_teacher/: local-dir folders
    return paths
