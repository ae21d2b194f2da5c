"""The run folder (``train.output_dir``): checked before anything is written, one run at a time,
a previous run never overwritten unasked, and the checkpoint to resume chosen among good ones.

Rank 0 calls :func:`plan_run` before the data and model are built: it checks that the folder
can be written (creating nothing), locks it when it exists, picks the checkpoint to continue
from (verified and loaded) and refuses a folder that holds a previous run's outputs unless
``train.overwrite``. Once the run is ready to write, :func:`open_run_dir` creates and locks the
folder, removes what ``overwrite`` replaces and the temporary files of interrupted writes.

The lock is an ``flock`` on ``<run>/.lock``, held for the life of the run. The OS drops it when
the process ends, however it ends, so the lock file a killed run leaves behind never blocks
resuming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import IO

import torch

from hvpmtl.data.skipped import SKIPPED_LIST, SKIPPED_PARTS
from hvpmtl.engine import checkpoint as ckpt_io
from hvpmtl.engine.distributed import DistEnv, broadcast_object
from hvpmtl.engine.vocabulary import CLASSES_FILE

LOCK_NAME = ".lock"
IDENTITY_FILE = "identity.json"  # a downstream run folder's source weights and data (eval/identity.py)
DOWNSTREAM_COMMANDS = ("finetune", "detect", "segment")  # their folders sit inside the pre-training run
ENVIRONMENT = "environment.jsonl"  # one line per start of the run: versions, device, threads
OUTPUTS = ("config.yaml", "metrics.csv", "model.safetensors", "backbone.safetensors", "teacher_backbone.safetensors",
           "timm", "timm_teacher",  # backbones/timm_config.py
           ckpt_io.CKPT_DIR, "tb", "trackers.json", "wandb", "pictures", SKIPPED_LIST, SKIPPED_PARTS, "eval.csv",
           ENVIRONMENT, CLASSES_FILE, IDENTITY_FILE)  # fmt: skip  (IDENTITY_FILE: eval/identity.py)
FINISHED = ("model.safetensors", "backbone.safetensors")  # written only by a run that ended well
BAD_SUFFIX = ".bad"
_TMP_RE = re.compile(r"^\..+\.tmp\d+$")  # atomic_write's temporary files
_held: dict[Path, IO[str]] = {}  # run folders this process has locked -> their open lock file


def _key(run_dir: Path) -> str:
    return f"train.output_dir={run_dir}"


def check_output_dir(run_dir: Path) -> None:
    """Raise ``ValueError`` unless ``run_dir`` is a writable folder or can be created as one.
    Creates nothing."""
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        what = "a file, not a folder" if run_dir.exists() else "a broken symbolic link"
        raise ValueError(f"{_key(run_dir)}: {run_dir} is {what}")
    probe = run_dir.absolute()
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{_key(run_dir)}: {probe} is not a folder, so the run folder cannot be created in it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{_key(run_dir)}: {probe} is not writable (read-only or no permission)")


# ----------------------------------------------------------------------------------------------
# lock


def lock_run_dir(run_dir: Path) -> None:
    """Take the folder's lock for this process (a no-op if it holds it); ``ValueError`` naming the
    process that holds it otherwise."""
    key = run_dir.resolve()
    if key in _held:
        return
    try:
        f = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the life of the run
    except OSError as err:
        raise ValueError(f"{_key(run_dir)}: cannot create its lock file ({err.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"{_key(run_dir)} is in use by another run (pid {pid})") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = f


def unlock_run_dir(run_dir: str | Path) -> None:
    """Release the lock this process holds on ``run_dir`` (if any)."""
    f = _held.pop(Path(run_dir).resolve(), None)
    if f is not None:
        f.close()  # closing the file releases the flock


# ----------------------------------------------------------------------------------------------
# previous outputs, stale files


def previous_outputs(run_dir: Path) -> list[str]:
    """The outputs of an earlier run found in ``run_dir`` (names, folders with a trailing ``/``)."""
    return [name + ("/" if (run_dir / name).is_dir() else "") for name in OUTPUTS if (run_dir / name).exists()]


def clear_previous_outputs(run_dir: Path) -> list[str]:
    """Delete an earlier run's outputs (:data:`OUTPUTS`) from ``run_dir``; returns what went."""
    removed = previous_outputs(run_dir)
    for name in OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    return removed


def remove_stale_tmp(run_dir: Path) -> list[str]:
    """Delete the temporary files that killed writes left in the run and checkpoint folders."""
    removed = []
    for folder in (run_dir, run_dir / ckpt_io.CKPT_DIR):
        if folder.is_dir():
            for path in folder.iterdir():
                if _TMP_RE.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
    return sorted(removed)


def remove_unstarted_outputs(run_dir: Path) -> None:
    """After a new run failed before its first step (a bad image in the first batch, say): remove
    the outputs it had begun (config.yaml, metrics.csv, tb/, ...), which hold nothing a later run
    could use, so that the same command starts afresh instead of meeting a half-made folder. A
    folder with a checkpoint keeps everything."""
    if ckpt_io.find_latest(run_dir) is None and (removed := clear_previous_outputs(run_dir)):
        print(f"{run_dir}: the run failed before its first step; removed what it had begun "
              f"({', '.join(removed)})")  # fmt: skip  (stdout: the error stays the one line on stderr)


def _refuse_previous_run(run_dir: Path, overwrite: bool) -> None:
    found = previous_outputs(run_dir)
    if not found or overwrite:
        return
    latest = ckpt_io.find_latest(run_dir)
    if latest is not None:
        hint = f"continue it with train.resume=auto (or --resume PATH; latest checkpoint: {latest.name}), "
    else:
        hint = "it has no checkpoint to continue from; "
    raise ValueError(
        f"{_key(run_dir)} holds a previous run ({', '.join(found)}): {hint}replace it with "
        "train.overwrite=true (--overwrite), or choose another train.output_dir"
    )


def _restart_unfinished(run_dir: Path) -> None:
    """``train.resume=auto`` in a folder whose run stopped before its first checkpoint (outputs,
    but no checkpoint and no exported weights): nothing there can be resumed, so its outputs are
    cleared and the run starts again from step 0. A finished run is left to the refusal."""
    found = previous_outputs(run_dir)
    if found and not any((run_dir / name).exists() for name in FINISHED):
        clear_previous_outputs(run_dir)
        print(f"{_key(run_dir)}: the run there stopped before its first checkpoint; starting it again "
              f"from step 0 (removed its {', '.join(found)})")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# choosing the checkpoint


def _newest_good_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, with its state; damaged newer ones are set aside as
    ``*.bad`` with a warning; ``ValueError`` if there are checkpoints and none loads."""
    bad: list[tuple[Path, str]] = []
    for _, path in reversed(ckpt_io.list_checkpoints(run_dir)):
        try:
            state = ckpt_io.load_checkpoint(path)
        except ckpt_io.CheckpointError as err:
            bad.append((path, str(err).removeprefix(f"{path}: ")))
            continue
        return _set_aside(bad, path), state
    if bad:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in bad)
        raise ValueError(
            f"train.resume=auto: no usable checkpoint in {run_dir / ckpt_io.CKPT_DIR} ({reasons}); "
            "replace the run with train.overwrite=true, or choose another train.output_dir"
        )
    return None


def _set_aside(bad: list[tuple[Path, str]], good: Path) -> Path:
    """Rename the damaged checkpoints newer than ``good`` to ``*.bad`` (so that neither resuming
    nor pruning takes them for checkpoints) and say so; returns ``good``."""
    for path, why in bad:
        for f in (path, ckpt_io.checksum_path(path)):
            if f.exists():
                f.replace(f.with_name(f.name + BAD_SUFFIX))
        print(f"warning: train.resume=auto: skipped damaged checkpoint {path} ({why}), renamed to {path.name}.bad")
    if bad:
        print(f"warning: train.resume=auto: resuming from the newest good checkpoint, {good.name}")
    return good


def _inside(path: Path, run_dir: Path) -> bool:
    return path.resolve().parent.parent == run_dir.resolve()


def plan_run(run_dir: Path, resume: str, overwrite: bool) -> tuple[Path | None, dict | None]:
    """Rank 0, before the run builds anything: check and lock the folder, and return the checkpoint
    to resume with its loaded state (or ``(None, None)`` for a fresh run). ``ValueError`` (or
    ``OSError``) says why the run cannot start; the lock is released then."""
    check_output_dir(run_dir)
    if run_dir.is_dir():
        lock_run_dir(run_dir)
    try:
        if resume == "auto":
            if overwrite:
                raise ValueError("train.resume=auto and train.overwrite=true contradict each other: choose one")
            found = _newest_good_checkpoint(run_dir)
            if found is not None:
                return found
            _restart_unfinished(run_dir)
        elif resume:
            path = Path(resume)
            state = ckpt_io.load_checkpoint(path)
            if _inside(path, run_dir):
                if overwrite:
                    raise ValueError(f"train.overwrite=true would delete {path}, the checkpoint to resume: choose one")
                return path, state
            _refuse_previous_run(run_dir, overwrite)
            return path, state
        _refuse_previous_run(run_dir, overwrite)
        return None, None
    except BaseException:
        unlock_run_dir(run_dir)
        raise


def choose_checkpoint(run_dir: Path, resume: str, overwrite: bool, env: DistEnv) -> tuple[Path | None, dict | None]:
    """Every rank: rank 0 runs :func:`plan_run` and tells the others the checkpoint to resume
    (``None`` for a fresh run) or why the run cannot start (``ValueError`` on every rank). The
    loaded state comes back on rank 0 only (``None`` on the others, which load it themselves)."""
    choice: tuple[str, str] = ("none", "")
    state = None
    if env.is_main:
        try:
            path, state = plan_run(run_dir, resume, overwrite)
            choice = ("path", str(path)) if path is not None else choice
        except (ValueError, OSError) as err:
            choice = ("error", str(err))
    kind, value = broadcast_object(choice, env)
    if kind == "error":
        raise ValueError(value)
    return (Path(value), state) if kind == "path" else (None, None)


def open_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Rank 0, once the run is ready to write: create and lock the folder, remove a previous run's
    outputs when ``overwrite``, and the temporary files of interrupted writes."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{_key(run_dir)}: cannot create it ({err.strerror})") from None
    lock_run_dir(run_dir)
    if overwrite and (removed := clear_previous_outputs(run_dir)):
        print(f"train.overwrite=true: removed the previous run's {', '.join(removed)} from {run_dir}")
    if stale := remove_stale_tmp(run_dir):
        print(f"removed {len(stale)} temporary file(s) left by interrupted writes: {', '.join(stale)}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


# train.* keys that define the schedule or the random streams of a run; the other train.* keys
# (resume, overwrite, output_dir, progress, device, logging and checkpoint cadence) change by design
SCHEDULE_KEYS = ("train.epochs", "train.max_steps", "train.accum_steps", "train.seed")


def changed_config_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose value differs between a checkpoint's config and this run's: every key
    outside ``train.*``, and the :data:`SCHEDULE_KEYS` of ``train.*``."""
    old, new = _flat(saved), _flat(current)
    return sorted(k for k in new if k in old and old[k] != new[k] and
                  (not k.startswith("train.") or k in SCHEDULE_KEYS))  # fmt: skip


def describe_changes(saved: dict, current: dict, keys: list[str]) -> str:
    """``"key old -> new, ..."`` for the resume warning (long values cut to 40 characters)."""
    old, new = _flat(saved), _flat(current)

    def short(value) -> str:
        text = str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{k} {short(old.get(k))} -> {short(new.get(k))}" for k in keys)


# ----------------------------------------------------------------------------------------------
# environment


def package_version() -> str:
    """The installed ``hvpmtl`` version (its package metadata; the engine does not import the
    package root); ``unknown`` when run from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hvpmtl")
    except PackageNotFoundError:
        return "unknown"


def environment(world_size: int, device: torch.device) -> dict:
    """What a run's numbers depend on besides its config: versions, device, processes and the
    CPU threads (1 and 2 threads already differ in the fifth digit of the loss after 20 steps)."""
    import timm
    import torchvision

    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
        "python": sys.version.split()[0], "platform": platform.platform(), "hvpmtl": package_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "device": device.type, "world_size": world_size, "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return info


def record_environment(run_dir: Path, start_step: int, info: dict) -> None:
    """Append ``info`` and the step the run starts (or resumes) at to ``environment.jsonl``."""
    with open(run_dir / ENVIRONMENT, "a") as f:
        f.write(json.dumps({"start_step": start_step, **info}) + "\n")


def downstream_run_folders(run_dir: str | Path) -> list[Path]:
    """The downstream run folders inside a pre-training run folder: ``<command>-*/`` folders (not
    links) whose ``identity.json`` names that command, i.e. the ones this package wrote."""
    found = []
    for path in sorted(Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []:
        command = path.name.split("-", 1)[0]
        ours = command in DOWNSTREAM_COMMANDS and path.is_dir() and not path.is_symlink()
        if not ours or not (path / IDENTITY_FILE).is_file():
            continue
        try:
            recorded = json.loads((path / IDENTITY_FILE).read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded == command:
            found.append(path)
    return found


def remove_downstream_runs(run_dir: str | Path) -> list[str]:
    """Delete :func:`downstream_run_folders` of ``run_dir`` (``pretrain --overwrite``: they were
    trained from the weights being replaced); one still in use by a running command is kept, with a
    warning. Returns the names removed."""
    removed = []
    for folder in downstream_run_folders(run_dir):
        try:
            lock_run_dir(folder)
        except ValueError as err:
            print(f"warning: train.overwrite=true: kept {folder} ({err})")
            continue
        try:
            shutil.rmtree(folder)
        finally:
            unlock_run_dir(folder)
        removed.append(folder.name)
    return removed
