"""The class names a pre-training run was trained on, stored with it.

Logit ``k`` of the MLC head means ``classes[k]`` of the data the run was trained on. The names
go into every checkpoint (``class_names``), into ``model.safetensors``'s metadata and into
``classes.json`` beside ``config.yaml``. A resume whose data names other classes, or the same in
another order, is refused (the logits would learn other tags); a checkpoint written before names
were stored resumes with a warning. Scoring the head on other data maps its tags by name.
"""

from __future__ import annotations

import json
from pathlib import Path

CLASSES_FILE = "classes.json"


def first_difference(old: list[str], new: list[str]) -> str | None:
    """``"index i: 'a' in the run, 'b' in the data"`` for the first place the lists differ, or None."""
    for i in range(max(len(old), len(new))):
        a = repr(old[i]) if i < len(old) else "nothing"
        b = repr(new[i]) if i < len(new) else "nothing"
        if a != b:
            return f"index {i}: {a} in the run, {b} in the data"
    return None


def check_resume_classes(saved: list[str] | None, current: list[str] | None, path: str | Path) -> str | None:
    """``ValueError`` when the checkpoint at ``path`` was trained on other class names than the data
    now gives; a warning line when the checkpoint stores none (it cannot be checked), else None."""
    if current is None:
        return None
    if saved is None:
        return (f"warning: {path} stores no class names (written by an older version): the vocabulary "
                f"({len(current)} classes) cannot be checked against the one it was trained on")  # fmt: skip
    if (diff := first_difference(list(saved), list(current))) is not None:
        raise ValueError(
            f"{path}: the class names differ from the data's ({diff}): the MLC logits would learn other tags; "
            "resume with the vocabulary the run was trained on (data.classes / data.classes_file), or start "
            "a new run (train.overwrite=true or another train.output_dir)"
        )
    return None


def write_classes_file(run_dir: str | Path, names: list[str]) -> None:
    """``run_dir/classes.json``: the names as a JSON list (tags may hold any character)."""
    from hvpmtl.engine.checkpoint import atomic_write

    text = json.dumps(list(names), ensure_ascii=False) + "\n"
    atomic_write(Path(run_dir) / CLASSES_FILE, lambda f: f.write(text.encode("utf-8")))


def logit_order(run_names: list[str], data_names: list[str]) -> list[int] | None:
    """Which logit scores each of the data's tags: None when the lists are equal, the run's index of
    each data tag when the data has the same tags in another order; ``ValueError`` naming the first
    data tag the run does not know (or the first run tag the data lacks) otherwise."""
    if list(run_names) == list(data_names):
        return None
    index = {name: k for k, name in enumerate(run_names)}
    for name in data_names:
        if name not in index:
            raise ValueError(
                f"the data's tag {name!r} is not one of the run's {len(run_names)} classes: its MLC head cannot "
                "score it (give data.classes / data.classes_file with the run's vocabulary, or data of its tags)"
            )
    missing = [name for name in run_names if name not in set(data_names)]
    if missing or len(data_names) != len(run_names):
        raise ValueError(
            f"the data lacks the run's class {missing[0]!r} ({len(data_names)} tags, the run {len(run_names)})"
            if missing else f"the data repeats a tag ({len(data_names)} tags, the run {len(run_names)})"
        )  # fmt: skip
    return [index[name] for name in data_names]
