"""``hvpmtl noise-report``: the given tags a pre-trained run's teacher most strongly contradicts.

Every (image, tag) pair of a split is scored with the MLC head's probability ``p`` (the EMA
teacher's; the student's when the run has no teacher): a tag that is absent but likely is
*probably missing* (score ``p``), a tag that is given but unlikely is *probably wrong* (score
``1 - p``), i.e. ``score = |given - p|``. Pairs are ranked by score, images by their highest
pair score (ties: lower index first). On the built-in data sets with ``data.label_noise`` > 0 the
injected flips are known (``clean_labels``): precision@K, recall@K and average precision of the
pair ranking measure how well the teacher finds them, against chance (the share of flipped pairs
among the candidates: the precision of a random ranking). The data's tags are matched to the
head's logits by name, and the head's own held-out mAP says whether the ranking can be trusted
(:mod:`hvpmtl.eval.head_check`).

>>> score, missing = pair_scores(torch.tensor([[0.75, 0.25]]), torch.tensor([[0.0, 1.0]]))
>>> score.tolist(), missing.tolist()
([[0.75, 0.75]], [[True, False]])
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from hvpmtl.config import ConfigError
from hvpmtl.data import EvalTransform, build_dataset
from hvpmtl.data.config import DataConfig
from hvpmtl.engine.config import _checker
from hvpmtl.engine.distributed import resolve_device
from hvpmtl.eval.config import RuntimeConfig
from hvpmtl.eval.head_check import TaggedImages, describe, head_check, head_probabilities
from hvpmtl.eval.heads import head_order, load_pretrained_model
from hvpmtl.eval.report import data_label
from hvpmtl.runs import WeightsError, model_part

FILES = ("noise_report.csv", "noise_report.html", "noise_report.json")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads such a cell as a formula


@dataclass
class NoiseReportConfig:
    """``hvpmtl noise-report``: which images are checked and what the report shows."""

    data: DataConfig = field(default_factory=DataConfig)  # starts from the run's data (label_noise included)
    split: str = "train"  # train | val | test (data.label_noise applies to train only)
    images: int = 0  # the first N images of the split; 0 = all
    head: str = "teacher"  # teacher | student (the teacher falls back to the student when the run has none)
    top: int = 50  # images shown in noise_report.html
    min_score: float = 0.5  # pairs written to noise_report.csv: score >= min_score (0 = every pair)
    ks: list[int] = field(default_factory=lambda: [100, 500, 1000])  # precision@K / recall@K, plus K = #errors
    thumb_size: int = 96  # thumbnail side in pixels
    run: RuntimeConfig = field(default_factory=RuntimeConfig)  # device, batch size, workers, output_dir

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.split in ("train", "val", "test"), "split", "choose train, val or test")
        check(self.images >= 0, "images", "must be >= 0 (0: all)")
        check(self.head in ("teacher", "student"), "head", "choose teacher or student")
        check(self.top >= 0, "top", "must be >= 0")
        check(0.0 <= self.min_score <= 1.0, "min_score", "must be in [0, 1]")
        check(all(k > 0 for k in self.ks), "ks", "every K must be positive")
        check(self.thumb_size >= 8, "thumb_size", "must be >= 8 pixels")


# ---------------------------------------------------------------------------------------------
# scoring and ranking (pure tensor functions)


def pair_scores(probs: torch.Tensor, given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How strongly ``probs`` (``N x C``) contradict the multi-hot ``given`` tags: ``|given - p|``,
    and ``missing`` (``N x C`` bool: the tag is absent, so a high score means *probably missing*;
    otherwise *probably wrong*)."""
    missing = given < 0.5
    return torch.where(missing, probs, 1.0 - probs), missing


def rank_pairs(score: torch.Tensor) -> torch.Tensor:
    """Flat indices ``image * C + tag`` of ``score`` (``N x C``), highest first, ties by index."""
    return torch.sort(score.flatten(), descending=True, stable=True).indices


def rank_images(score: torch.Tensor) -> torch.Tensor:
    """Image indices ordered by their highest pair score, highest first, ties by index."""
    return torch.sort(score.amax(dim=1), descending=True, stable=True).indices


def detection_table(
    score: torch.Tensor, missing: torch.Tensor, flipped: torch.Tensor, ks: list[int]
) -> list[dict]:
    """Precision@K / recall@K / AP of ranking pairs by ``score`` at finding the ``flipped`` ones.

    One row per candidate set: ``all`` pairs, ``missing`` (given absent: dropped tags) and
    ``wrong`` (given present: added tags). ``chance`` = errors / candidates (a random ranking's
    precision at any K); a random ranking's recall@K is ``K / candidates``. The Ks are
    ``K = errors`` (where precision equals recall) followed by ``ks`` below the candidate count.
    """
    rows = []
    for name, keep in (("all", torch.ones_like(missing)), ("missing", missing), ("wrong", ~missing)):
        n = int(keep.sum())
        errors = int((flipped & keep).sum())
        row: dict = {"pairs": name, "candidates": n, "errors": errors, "chance": errors / n if n else 0.0}
        if n == 0 or errors == 0:
            rows.append({**row, "ap": None, "at": []})
            continue
        hits = flipped[keep][torch.sort(score[keep], descending=True, stable=True).indices].float()
        found = hits.cumsum(0)
        ranks = torch.arange(1, n + 1, dtype=torch.float64)
        ap = float((found.double() / ranks)[hits.bool()].mean())
        at = []
        for k in dict.fromkeys([errors, *(k for k in ks if k < n)]):
            h = float(found[k - 1])
            at.append({"k": k, "precision": h / k, "recall": h / errors, "chance_recall": k / n})
        rows.append({**row, "ap": ap, "at": at})
    return rows


def format_table(rows: list[dict]) -> str:
    """The detection table as aligned text (percentages)."""
    head = f"{'pairs':<8} {'candidates':>10} {'errors':>7} {'chance':>7} {'AP':>6} {'K':>6} {'P@K':>6} {'R@K':>6} "
    lines = [head + f"{'lift':>5}  (random R@K)"]
    for r in rows:
        first = f"{r['pairs']:<8} {r['candidates']:>10} {r['errors']:>7} {100 * r['chance']:>6.1f}%"
        first += f" {100 * r['ap']:>5.1f}%" if r["ap"] is not None else f" {'-':>6}"
        if not r["at"]:
            lines.append(first + "  (no injected errors among these pairs)")
        for i, a in enumerate(r["at"]):
            lead = first if i == 0 else " " * len(first)
            lift = a["precision"] / r["chance"]
            lines.append(f"{lead} {a['k']:>6} {100 * a['precision']:>5.1f}% {100 * a['recall']:>5.1f}% {lift:>5.1f}"
                         f"  ({100 * a['chance_recall']:.1f}%)")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# images -> probabilities


def image_name(base: Dataset, index: int, split: str) -> str:
    """The image's file path when the data set reads files, else ``<split> #<index>``."""
    paths = getattr(base, "paths", None)
    return str(paths[index]) if paths is not None else f"{split} #{index}"


def thumbnail_png(image: torch.Tensor, size: int) -> str:
    """uint8 ``3 x H x W`` -> base64 PNG whose longer side is ``size`` (nearest when enlarging)."""
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    scale = size / max(pil.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), resample)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# the report files


@dataclass
class Scored:
    """Everything the report files are written from (one row per image read)."""

    probs: torch.Tensor  # N x C, the head's probabilities
    given: torch.Tensor  # N x C multi-hot, the tags being checked
    clean: torch.Tensor | None  # N x C, the tags before label noise (built-in data sets), else None
    names: list[str]  # N image names (file paths or "<split> #<index>")
    classes: list[str]  # C tag names
    head: str  # "teacher" or "student": whose probabilities

    def __post_init__(self) -> None:
        self.score, self.missing = pair_scores(self.probs, self.given)
        self.flipped = (self.given != self.clean) if self.clean is not None else None


def csv_cell(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would read it as a formula (OWASP's advice
    against CSV injection: cells starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return)."""
    return f"'{text}" if text[:1] in FORMULA_STARTS else text


def csv_text(s: Scored, min_score: float) -> str:
    """Pairs with ``score >= min_score``, best first: rank, image, index, tag, given, p, kind, score,
    image_rank (the image's place in the per-image ranking), injected (when the clean tags are known)."""
    C = len(s.classes)
    image_rank = torch.empty(len(s.names), dtype=torch.long)
    image_rank[rank_images(s.score)] = torch.arange(1, len(s.names) + 1)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "image", "index", "tag", "given", f"p_{s.head}", "kind", "score", "image_rank"]
               + (["injected"] if s.flipped is not None else []))  # fmt: skip
    flat, probs = s.score.flatten(), s.probs.flatten()
    for rank, j in enumerate(rank_pairs(s.score).tolist(), 1):
        if flat[j] < min_score:
            break
        i, c = divmod(j, C)
        kind = "probably missing" if s.missing[i, c] else "probably wrong"
        row = [rank, csv_cell(s.names[i]), i, csv_cell(s.classes[c]), int(s.given[i, c]), f"{probs[j]:.4f}", kind,
               f"{flat[j]:.4f}", int(image_rank[i])]  # fmt: skip
        w.writerow(row + ([int(s.flipped[i, c])] if s.flipped is not None else []))
    return buf.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
img{image-rendering:pixelated}.missing{color:#0a6}.wrong{color:#c30}.hit{font-weight:bold}
.num{text-align:right;font-variant-numeric:tabular-nums}"""


def _table_html(rows: list[dict]) -> str:
    out = ["<table><tr><th>pairs</th><th>candidates</th><th>errors</th><th>chance</th><th>AP</th><th>K</th>"
           "<th>precision@K</th><th>recall@K</th><th>random recall@K</th></tr>"]  # fmt: skip
    for r in rows:
        ap = f"{100 * r['ap']:.1f}%" if r["ap"] is not None else "-"
        lead = f"<td>{r['pairs']}</td><td class=num>{r['candidates']}</td><td class=num>{r['errors']}</td>"
        lead += f"<td class=num>{100 * r['chance']:.1f}%</td><td class=num>{ap}</td>"
        for a in r["at"] or [None]:
            cells = "<td colspan=4>no injected errors</td>" if a is None else (
                f"<td class=num>{a['k']}</td><td class=num>{100 * a['precision']:.1f}%</td>"
                f"<td class=num>{100 * a['recall']:.1f}%</td><td class=num>{100 * a['chance_recall']:.1f}%</td>")
            out.append(f"<tr>{lead}{cells}</tr>")
            lead = "<td colspan=5></td>"
    return "\n".join(out + ["</table>"])


def html_text(s: Scored, thumbs: dict[int, str], top: int, min_score: float, title: str, facts: list[str],
              table: list[dict] | None) -> str:  # fmt: skip
    """The self-contained page: facts, the detection table (when known), the ``top`` images with
    their thumbnails (``thumbs``: image index -> base64 PNG) and contradicted tags."""
    e = html.escape
    items = "".join(f"<li>{e(f)}</li>" for f in facts)
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body>\n<h1>{e(title)}</h1>\n<ul>{items}</ul>"]  # fmt: skip
    if table is not None:
        parts.append(f"<h2>Finding the injected label errors</h2>\n{_table_html(table)}")
    cols = "<th>rank</th><th>image</th><th>name</th><th>score</th><th>given tags</th><th>contradicted tags</th>"
    if s.clean is not None:
        cols += "<th>clean tags</th>"
        parts.append("<p>Bold: an injected error (the given tag differs from the clean one).</p>")
    parts.append(f"<h2>The {min(top, len(s.names))} most contradicted images</h2>\n<table><tr>{cols}</tr>")
    for rank, i in enumerate(rank_images(s.score)[:top].tolist(), 1):
        order = torch.sort(s.score[i], descending=True, stable=True).indices.tolist()
        shown = [c for c in order if s.score[i, c] >= min_score] or order[:1]
        flags = []
        for c in shown:
            kind = "missing" if s.missing[i, c] else "wrong"
            hit = " hit" if s.flipped is not None and s.flipped[i, c] else ""
            flags.append(f"<span class='{kind}{hit}'>{e(s.classes[c])}: probably {kind} (p {s.probs[i, c]:.2f})</span>")
        tags = ", ".join(e(s.classes[c]) for c in torch.nonzero(s.given[i]).flatten().tolist()) or "(none)"
        row = (f"<tr><td class=num>{rank}</td><td><img src=\"data:image/png;base64,{thumbs[i]}\" alt=''></td>"
               f"<td>{e(s.names[i])}</td><td class=num>{s.score[i].max():.3f}</td><td>{tags}</td>"
               f"<td>{'<br>'.join(flags)}</td>")  # fmt: skip
        if s.clean is not None:
            row += "<td>" + (", ".join(e(s.classes[c]) for c in torch.nonzero(s.clean[i]).flatten().tolist())) + "</td>"
        parts.append(row + "</tr>")
    parts.append("</table>\n</body></html>\n")
    return "\n".join(parts)


def write_report(s: Scored, out_dir: Path, thumbs: dict[int, str], cfg: NoiseReportConfig, title: str,
                 facts: list[str], table: list[dict] | None, check: dict | None = None) -> dict[str, Path]:  # fmt: skip
    """Write noise_report.csv / .html / .json atomically into ``out_dir``; their paths. ``check``:
    the head's held-out mAP against chance (:func:`hvpmtl.eval.head_check.head_check`)."""
    from hvpmtl.engine.checkpoint import atomic_write

    texts = {
        FILES[0]: csv_text(s, cfg.min_score),
        FILES[1]: html_text(s, thumbs, cfg.top, cfg.min_score, title, facts, table),
        FILES[2]: json.dumps({"title": title, "facts": facts, "head": s.head, "images": len(s.names),
                              "min_score": cfg.min_score, "detection": table, "head_check": check},
                             indent=2) + "\n",  # fmt: skip
    }
    paths = {}
    for name, text in texts.items():
        atomic_write(out_dir / name, lambda f, t=text: f.write(t.encode("utf-8")))
        paths[name] = out_dir / name
    return paths


# ---------------------------------------------------------------------------------------------
# the command


def run_noise_report(source: str | Path, cfg: NoiseReportConfig, out_dir: str | Path, log=print,
                     loaded: tuple | None = None) -> dict:  # fmt: skip
    """Score ``cfg.split`` of ``cfg.data`` with the run's MLC head and write the report to
    ``out_dir``. Returns ``{"paths", "table", "head", "images"}``; ``log`` gets what a user reads;
    ``loaded``: the ``(model, config)`` :func:`hvpmtl.eval.heads.load_pretrained_model` gave."""
    device = resolve_device(cfg.run.device)
    model, run_cfg = loaded or load_pretrained_model(source, device)
    model.to(device)
    if model.mlc is None or "mlc" not in model.weights:
        raise WeightsError(f"{source}: this run trained no MLC head (tasks.mlc.weight was 0): nothing scores tags")
    head, notes = cfg.head, []
    if head == "teacher" and model.teacher is None:
        notes.append(f"note: {source} has no teacher (tasks.distill.weight was 0): scoring with the student's MLC head")
        head = "student"
    backbone, decoder = model_part(model, head, source)
    size = run_cfg.backbone.img_size
    try:
        base = build_dataset(cfg.data, size, cfg.split)
    except ValueError as err:  # names the data.* key or the manifest line
        raise ConfigError(str(err)) from err
    classes = list(getattr(base, "classes", None) or [])
    if not classes:
        raise WeightsError(f"{source}: data.{cfg.data.dataset} names no tags to check")
    order = head_order(model, classes, source)  # the data's tags mapped to the head's logits by name
    count = min(cfg.images, len(base)) if cfg.images else len(base)
    has_clean = "clean_labels" in base[0]
    d = cfg.data
    images = TaggedImages(base, EvalTransform(size, d.eval_crop_pct, d.mean, d.std), count)
    loader = DataLoader(images, batch_size=cfg.run.batch_size, num_workers=cfg.run.num_workers)
    probs, given, clean, index = head_probabilities(backbone, decoder, loader, device, cfg.run.precision == "bf16",
                                                    order)  # fmt: skip
    names = [image_name(base, int(i), cfg.split) for i in index]
    s = Scored(probs, given, clean if has_clean else None, names, classes, head)
    check, why_not = None, ""  # the head's own mAP on held-out images (eval/head_check.py)
    if cfg.split != "train":
        check = head_check(probs, given, cfg.split)
    else:
        try:
            held = build_dataset(cfg.data, size, "val")
            held_order = head_order(model, list(getattr(held, "classes", None) or []), source)
            n = min(cfg.images, len(held)) if cfg.images else len(held)
            held_loader = DataLoader(TaggedImages(held, images.transform, n), batch_size=cfg.run.batch_size,
                                     num_workers=cfg.run.num_workers)  # fmt: skip
            hp, hy, _, _ = head_probabilities(backbone, decoder, held_loader, device, cfg.run.precision == "bf16",
                                              held_order)  # fmt: skip
            check = head_check(hp, hy, "val")
        except (ValueError, FileNotFoundError) as err:  # no val split, or one with other tags
            why_not = f"no usable val split: {(str(err).splitlines() or [''])[0][:200]}"
    trust_line, trust_warning = describe(check, why_not)

    table = None
    if s.flipped is not None and s.flipped.any():
        table = detection_table(s.score, s.missing, s.flipped, cfg.ks)
    run_name = Path(source).name if Path(source).is_dir() else str(source)
    title = f"Noise report: {run_name} ({head}), {data_label(d)} {cfg.split}"
    facts = [
        f"source: {source} ({head} MLC head)",
        f"data: {data_label(d)}, split {cfg.split}, {count} images x {len(classes)} tags, "
        f"data.label_noise {d.label_noise if cfg.split == 'train' else 0.0}",
        f"score = |given - p|: an absent tag with a high p is probably missing, a given tag with a low p "
        f"probably wrong; {int((s.score >= cfg.min_score).sum())} pairs score >= {cfg.min_score} (noise_report.csv)",
    ]
    facts += [trust_line, *notes]
    if trust_warning is not None:
        facts.insert(0, trust_warning)
        print(trust_warning, file=sys.stderr)
    if has_clean and table is None:
        facts.append("no injected label errors in these images (data.label_noise is 0, or the split is not train)")
    top = rank_images(s.score)[: cfg.top].tolist()
    thumbs = {i: thumbnail_png(base[int(index[i])]["image"], cfg.thumb_size) for i in top}
    paths = write_report(s, Path(out_dir), thumbs, cfg, title, facts, table, check)
    for f in facts:
        log(f)
    if table is not None:
        log(format_table(table))
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"paths": paths, "table": table, "head": head, "images": count}
