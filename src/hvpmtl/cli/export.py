"""``hvpmtl export RUN --out DIR [--part student|teacher] [--push REPO]``: one backbone of a run
in timm's Hugging Face Hub format.

``DIR`` gets what ``timm.models.save_for_hf`` writes, ``model.safetensors`` (timm keys) and
``config.json`` (architecture, model arguments and, in ``pretrained_cfg``, the run's
preprocessing), plus a model card ``README.md`` (the run's config, its data, the downstream
results found in ``RUN/eval/``). ``timm.create_model("local-dir:DIR", pretrained=True)`` rebuilds
the backbone; ``--push REPO`` uploads ``DIR`` as it is to that Hub model repository.

A ViT with ``backbone.stem_channels`` (hvpmtl's convolutional stem) has no timm architecture a
``config.json`` could name: its export holds the weights and the card only (one line says so;
``hvpmtl.load_backbone(DIR/model.safetensors)`` reads them), and ``--push`` is refused, since a
Hub repository timm cannot load would mislead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from hvpmtl.config import ConfigError

EXPORT_FILES = ("model.safetensors", "config.json", "README.md")


def cmd_export(args: argparse.Namespace) -> int:
    from hvpmtl.runs import Run

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or set(p.name for p in out.iterdir()) - set(EXPORT_FILES)):
        found = "a file" if not out.is_dir() else f"holds {sorted(p.name for p in out.iterdir())[:3]}"
        raise ConfigError(f"--out {out}: {found}; give a new or empty folder (or an earlier export)")
    if args.push:
        check_repo_id(args.push)
    run = Run(args.run)
    weights = run.weights(args.part)
    if args.push and weights.backbone.stem_channels:
        raise ConfigError(
            f"--push {args.push}: backbone.stem_channels={list(weights.backbone.stem_channels)}: timm cannot "
            "rebuild a convolutional stem from a config.json, so the Hub copy would not load; export without --push"
        )
    files = export_backbone(run, weights, out)
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    if args.push:
        url = push_folder(out, args.push, f"hvpmtl export of {weights.label}")
        print(f"pushed {out} to {url}")
    return 0


def export_backbone(run, weights, out: Path) -> list[str]:
    """Write ``weights`` (one backbone of ``run``) to ``out`` as timm's Hub format and a model card;
    returns the names written."""
    from safetensors.torch import save_file

    from hvpmtl.backbones.timm_config import write_timm_export
    from hvpmtl.config import to_dict

    config = dict(weights.pretrain or {})
    config["backbone"] = to_dict(weights.backbone)
    # a backbone file's metadata, as engine/checkpoint.py:export_weights writes it
    meta = {"format": "timm", "name": weights.backbone.name, "backbone_config": json.dumps(config["backbone"]),
            "part": weights.part, "label": weights.label}  # fmt: skip
    try:
        write_timm_export(out, weights.state, config, meta)
        files = ["model.safetensors", "config.json"]
    except ValueError as err:  # a convolutional stem: the weights alone
        (out / "config.json").unlink(missing_ok=True)  # an earlier export's would describe other weights
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.state.items()}, str(out / "model.safetensors"), metadata=meta)
        files = ["model.safetensors"]
        print(f"no config.json written for timm: {err}")
    (out / "README.md").write_text(model_card(run, weights, config, timm_loads="config.json" in files))
    return [*files, "README.md"]


def model_card(run, weights, config: dict, timm_loads: bool = True) -> str:
    """The ``README.md`` of an export: how to load it, its preprocessing, the run's data, its
    downstream results (``RUN/eval/*.json``) and the whole config."""
    from hvpmtl.backbones.timm_config import preprocessing
    from hvpmtl.eval.report import format_metrics

    data = config.get("data") or {}
    names = run.class_names
    classes = len(names) if names is not None else data.get("num_classes", "unknown")
    pre = preprocessing(config)
    name = run.folder.name
    lines = ["---", "library_name: timm", "tags:", "- image-feature-extraction", "- timm", "- hvpmtl", "---", "",
             f"# {name}: {weights.part} backbone", "",
             f"The {weights.part} backbone ({weights.label}) of an HVP-MTL pre-training run (multi-label "
             "classification, SwAV, SimMIM and momentum distillation on one backbone): a timm "
             f"`{weights.backbone.name}` without classifier, exported by `hvpmtl export`.", ""]  # fmt: skip
    if timm_loads:
        lines += ["```python", "import timm", "", 'model = timm.create_model("hf-hub:REPO", pretrained=True)  '
                  '# or "local-dir:FOLDER"', "data_config = timm.data.resolve_model_data_config(model)",
                  "transform = timm.data.create_transform(**data_config)",
                  "features = model.forward_features(transform(image).unsqueeze(0))", "```", ""]  # fmt: skip
    else:
        lines += ["timm cannot rebuild this backbone from a config (`backbone.stem_channels`: a convolutional "
                  "stem); load the weights with `hvpmtl.load_backbone(\"FOLDER/model.safetensors\")`.", ""]  # fmt: skip
    lines += ["## Preprocessing", "", "| input size | mean | std | crop_pct | interpolation |", "|---|---|---|---|---|",
              f"| {pre['input_size'][1]} | {list(pre['mean'])} | {list(pre['std'])} | {pre['crop_pct']} | "
              f"{pre['interpolation']} |", "", "## Data", "", f"- source: {data_source(data)}",
              f"- classes: {classes}", f"- seed: {data.get('seed', 'default')}", "", "## Evaluation", ""]  # fmt: skip
    results = run.results()
    if results:
        lines += ["| command | data | weights | metrics |", "|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['command']} | {r['data']} | {r['weights']} | {format_metrics(r['metrics'])} |")
    else:
        lines.append(f"No downstream results in {run.folder / 'eval'} when this was exported.")
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def data_source(data: dict) -> str:
    """Where a run's images came from, from its data block."""
    dataset = data.get("dataset", "synthetic")
    if dataset == "manifest":
        return f"manifest {data.get('manifest', '?')}"
    if data.get("root"):
        return f"{dataset} {data['root']}"
    return str(dataset)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"--push {repo_id}: {str(err).splitlines()[0]}") from None


def push_folder(folder: Path, repo_id: str, message: str) -> str:
    """Upload ``folder`` as it is to the Hub model repository ``repo_id`` (created when missing);
    returns the repository's URL. Any failure is one line naming the repository."""
    from huggingface_hub import HfApi

    api = HfApi(library_name="hvpmtl")
    try:
        repo = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    except Exception as err:  # no token, offline, HTTP errors: the Hub client raises many kinds
        why = (str(err).splitlines() or [""])[0][:200]
        raise ConfigError(
            f"--push {repo_id}: the upload failed ({type(err).__name__}: {why}); {folder} is kept"
        ) from None
    return str(repo)


def add_parsers(sub) -> None:
    text = "write a run's backbone in timm's Hub format (weights, config.json, model card), optionally push it"
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument("run", metavar="RUN", help="run folder, checkpoint (.pt) or .safetensors file")
    p.add_argument("--out", "-o", required=True, help="folder to write (new, empty or an earlier export)")
    p.add_argument("--part", choices=("student", "teacher"), default="student",
                   help="which backbone: the student (default) or the EMA teacher")  # fmt: skip
    p.add_argument("--push", metavar="REPO", help="upload the folder to this Hugging Face Hub model repository")
    p.set_defaults(func=cmd_export)
