"""The configuration reference: every key of a config dataclass tree, its type, default and help.

The help of a key is the ``metadata={"help": ...}`` of its field where there is one, else the
comment on the field's line (with the ``# | ...`` lines that continue it), else the comment lines
right above the field, else the first sentence of the block's docstring that names the key.
``hvpmtl config --explain`` prints it; the docs site's configuration page is made from it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from hvpmtl.config_io import ConfigError


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted name, type as written, default and one paragraph of help."""

    key: str
    type: str
    default: Any
    help: str


def _type_text(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def show(value: Any) -> str:
    """A value as it is written in YAML or in a ``key=value`` override."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value != value.strip() else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


@cache
def _comments(cls: type) -> dict[str, str]:
    """``field name -> help`` from the comments in ``cls``'s source (empty when it has none)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # made at run time (TasksConfig) or no source shipped
        return {}
    line_comments = {}  # line number -> comment text
    code_lines = set()  # lines holding code
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line_comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(source).body[0].body
    fields = [n for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    helps = {}
    for node in fields:
        trailing = [line_comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in line_comments]
        if trailing:
            line = node.end_lineno + 1  # "# | more choices" lines below continue the trailing comment
            while line in line_comments and line not in code_lines and line_comments[line].startswith("|"):
                trailing.append(line_comments[line])
                line += 1
            helps[node.target.id] = " ".join(trailing)
            continue
        above, line = [], node.lineno - 1
        while line in line_comments and line not in code_lines and not line_comments[line].startswith("|"):
            above.insert(0, line_comments[line])
            line -= 1
        helps[node.target.id] = " ".join(above)
    return helps


def _from_docstring(cls: type, name: str) -> str:
    """The first sentence of ``cls``'s docstring that names ``name`` in double backquotes."""
    doc = " ".join((inspect.getdoc(cls) or "").split())
    for sentence in re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.:;])\s+(?=[A-Z(`])", doc):
        if f"``{name}``" in sentence:
            return sentence
    return ""


# Help for the keys whose field has neither a comment nor ``metadata={"help": ...}``; a key
# documented in its own file needs no entry here.
MORE_HELP = {
    "tasks.mlc.weight": "alpha_1: weight of the MLC loss in the total loss, Eq. (7); 0 = the task is not built",
    "tasks.mlc.eta": "eta: weight of the positive term of the asymmetric loss",
    "tasks.swav.weight": "alpha_2: weight of the SwAV loss in Eq. (7); 0 = the task is not built",
    "tasks.swav.temperature": "tau: softmax temperature of the swapped prediction",
    "tasks.swav.t_max": "Sinkhorn's exponent clamp T_max (the paper's overflow guard; see stabilize)",
    "tasks.mim.weight": "alpha_3: weight of the SimMIM loss in Eq. (7); 0 = the task is not built",
    "tasks.distill.weight": "alpha_4: weight of momentum distillation in Eq. (7); 0 = the task is not built",
    "data.hflip": "probability of a horizontal flip",
    "optim.lr": "peak learning rate, reached at the end of the warm-up (for data.batch_size)",
    "optim.min_lr": "learning rate at the last step, where the cosine ends",
    "optim.weight_decay_end": "weight decay at the last step of a cosine schedule (DINO); None: constant weight decay",
    "train.output_dir": "run folder (downstream commands: empty = a folder beside the evaluated run)",
    "eval.knn_every": "run the k-NN monitor every N steps and at the last step; 0 = off",
    "eval.knn_train_images": "the first N train images form the k-NN monitor's bank",
    "eval.knn_val_images": "the first N val images are the k-NN monitor's queries",
    "backbone.name": "timm model name (any ViT or Swin), e.g. vit_base_patch16_224, swin_base_patch4_window7_224",
    "backbone.img_size": "input side in pixels; the views are cropped to it and timm resizes position embeddings",
    "backbone.drop_path_rate": "stochastic depth rate of the backbone (timm)",
    "backbone.grad_checkpointing": "timm's activation checkpointing: less memory, one more forward per block",
    "tasks.mlc.num_layers": "Query2Label decoder layers",
    "tasks.mlc.num_heads": "attention heads of the decoder",
    "tasks.mlc.ffn_dim": "hidden width of the decoder's feed-forward layers",
    "tasks.mlc.dropout": "dropout in the decoder",
    "tasks.mlc.gamma_neg": "explicit gamma- (overrides focusing); None: from focusing",
    "tasks.swav.hidden_dim": "hidden width of the projection MLP",
    "tasks.swav.out_dim": "width of the L2-normalised feature compared with the prototypes",
    "tasks.swav.num_prototypes": "number of prototypes K",
    "tasks.swav.epsilon": "Sinkhorn-Knopp's entropy regularisation (SwAV's epsilon)",
    "tasks.swav.sinkhorn_iters": "Sinkhorn-Knopp iterations",
    "tasks.swav.freeze_prototypes_iters": "steps during which the prototypes get no update (SwAV's first epoch)",
    "tasks.mim.mask_patch_size": "side of a mask unit in pixels; must tile the image and the token grid",
    "tasks.mim.mask_ratio": "share of mask units masked in the masked view",
    "data.train_size": "generated sets: number of train images (fmnist: 0 = all)",
    "data.val_size": "generated sets: number of val images (fmnist: 0 = all)",
    "data.num_workers": "DataLoader worker processes; 0 = load in the training process",
    "data.pin_memory": "pin batches in page-locked memory for faster host-to-device copies",
    "data.mean": "per-channel mean for normalisation (ImageNet's)",
    "data.std": "per-channel std for normalisation (ImageNet's)",
    "data.crop_scale": "random resized crop: area range, as a share of the image (SimMIM's)",
    "data.crop_ratio": "random resized crop: aspect ratio range",
    "data.color_jitter_prob": "probability of applying colour jitter to a view",
    "data.rand_augment": "RandAugment on or off",
    "data.rand_augment_ops": "RandAugment: ops per view (n)",
    "optim.weight_decay": "AdamW weight decay (norms, biases, tokens and embeddings take none)",
    "optim.betas": "AdamW betas",
    "optim.eps": "AdamW epsilon",
    "optim.warmup_epochs": "linear warm-up length in epochs (see warmup_steps)",
    "train.epochs": "passes over the train split (see max_steps)",
    "train.seed": "seed of initialisation, views and masks (with the epoch and image index)",
    "train.wandb.project": "W&B project",
    "train.wandb.tags": "W&B run tags",
    "train.mlflow.experiment": "MLflow experiment name",
    "eval.knn_k": "neighbours that vote in the k-NN monitor",
    "eval.knn_temperature": "temperature T of the votes' weights exp(s / T)",
    "eval.knn_feature": "feature the k-NN monitor embeds: mean | pooled | both | grid",
}


def _help(owner: type, f: dataclasses.Field, key: str = "") -> str:
    if f.metadata.get("help"):
        return str(f.metadata["help"])
    if key in MORE_HELP:
        return MORE_HELP[key]
    for cls in owner.__mro__:  # the class that declares the field holds its comment
        if f.name in getattr(cls, "__annotations__", {}):
            text = _comments(cls).get(f.name, "")
            if text:
                return text
    return _from_docstring(owner, f.name)


def block_doc(cls: type) -> str:
    """The first paragraph of a config block's docstring, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def config_keys(cls: type | None = None, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of dataclass ``cls`` (the pre-training ``Config`` by default), in field order."""
    if cls is None:
        from hvpmtl.config import Config

        cls = Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, f"{key}.")
        else:
            out.append(KeyDoc(key, _type_text(tp), _default(f), _help(cls, f, key)))
    return out


def config_blocks(cls: type | None = None, prefix: str = "") -> list[tuple[str, type]]:
    """``(dotted prefix, dataclass)`` of every block of ``cls``, depth first, ``cls`` itself first."""
    if cls is None:
        from hvpmtl.config import Config

        cls = Config
    out = [(prefix.rstrip("."), cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_blocks(hints[f.name], f"{prefix}{f.name}.")
    return out


def explain(key: str = "", cls: type | None = None) -> list[KeyDoc]:
    """The keys ``key`` names: one leaf, every leaf of a block (``tasks.mlc``), or all (``""``).
    An unknown key raises :class:`ConfigError` naming it."""
    keys = config_keys(cls)
    if not key:
        return keys
    found = [k for k in keys if k.key == key or k.key.startswith(f"{key}.")]
    if not found:
        blocks = sorted({k.key.split(".")[0] for k in keys})
        raise ConfigError(
            f"unknown config key '{key}' (blocks: {', '.join(blocks)}; hvpmtl config --explain lists all)"
        )
    return found


def format_key(doc: KeyDoc, value: Any = dataclasses.MISSING, width: int = 100) -> str:
    """``key: type = default`` then the help, indented (and the config's value where it differs)."""
    head = f"{doc.key}: {doc.type} = {show(doc.default)}"
    if value is not dataclasses.MISSING and value != doc.default:
        head += f"  (here: {show(value)})"
    body = textwrap.fill(doc.help, width, initial_indent="    ", subsequent_indent="    ") if doc.help else ""
    return f"{head}\n{body}" if body else head


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(cls: type | None = None, title: str = "Configuration reference", intro: str = "") -> str:
    """The reference as a markdown page: one table per block (key, type, default, help)."""
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    keys = config_keys(cls)
    for prefix, block in config_blocks(cls):
        own = [k for k in keys if k.key.rsplit(".", 1)[0] == prefix and "." in k.key]
        if not own:
            continue
        lines += [f"## `{prefix}`", "", block_doc(block), "", "| key | type | default | help |", "|---|---|---|---|"]
        for k in own:
            lines.append(f"| `{k.key}` | `{_cell(k.type)}` | `{_cell(show(k.default))}` | {_cell(k.help)} |")
        lines.append("")
    return "\n".join(lines)
