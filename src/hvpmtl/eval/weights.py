"""What a downstream command evaluates: backbone weights from a run, a checkpoint or a file.

Every downstream command takes one ``SOURCE``:

* a run folder: its ``backbone.safetensors`` (student) or ``teacher_backbone.safetensors``
  (``--teacher``; ``model.safetensors`` for runs older than that file), or, for a run that has not
  finished, its latest checkpoint;
* a checkpoint ``checkpoints/step_*.pt`` (loaded with ``weights_only=True``);
* a ``backbone.safetensors`` or ``teacher_backbone.safetensors`` (timm keys; the backbone config
  and which part it is are stored in the file) or a ``model.safetensors`` (student and teacher);
* nothing, with ``--random-init`` and ``--config PRESET``: the backbone a pre-training preset
  starts from.

``--random-init`` with a source gives the very weights that run started from (same config, same
``train.seed``): the baseline every results table needs. (For a run that started from pretrained
weights or another run, ``backbone.pretrained*`` / ``init_from``, it is the random initialisation
those replaced.) Weights that do not fit the backbone
(missing or unexpected keys, other shapes) stop the command with the names of what differs.
The files are read by :class:`hvpmtl.runs.Run`; this module adds the random initialisations.
"""

from __future__ import annotations

from pathlib import Path

# the run reader (hvpmtl.runs) holds these; their home for the downstream commands stays here
from hvpmtl.runs import (  # noqa: F401
    STUDENT,
    TEACHER,
    Run,
    Weights,
    WeightsError,
    build_masked_backbone,
    check_tensors,
    load_into,
    metadata_json,
)


def resolve_weights(
    source: str | Path | None,
    teacher: bool = False,
    random_init: bool = False,
    pretrain_preset: str | None = None,
) -> Weights:
    """The :class:`Weights` that ``SOURCE`` (and the flags, as in the module docstring) names."""
    if source is None or str(source) == "":
        if not random_init:
            raise WeightsError(
                "give a run folder, a checkpoint or a .safetensors file (or --random-init --config PRESET)"
            )
        from hvpmtl.config import load_config, to_dict

        cfg = load_config(pretrain_preset or "cpu-tiny")
        name = pretrain_preset or "cpu-tiny"
        return Weights(cfg.backbone, None, f"random init ({name})", None, to_dict(cfg), cfg.train.seed)
    weights = Run(source).weights("teacher" if teacher else "student")
    if random_init:
        run_dir = weights.run_dir
        return Weights(weights.backbone, None, f"random init ({run_dir.name})", run_dir, weights.pretrain or {},
                       weights.seed)  # fmt: skip
    return weights
