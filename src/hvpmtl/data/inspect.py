"""What a data set holds, before a long run: counts, tags per image, the label long tail, label
co-occurrences, image sizes, and the files that are missing or cannot be read.

Works on any data set :func:`hvpmtl.data.build_dataset` returns. File-based sets
(:class:`~hvpmtl.data.manifest.ImageFiles`: manifests, image folders, the users' formats, shards)
are read cheaply: tags from the listing, existence per file, the size from the image header (PIL
reads no pixels); ``verify=True`` decodes every image as training does
(:func:`~hvpmtl.data.decode.read_image`). Generated sets (synthetic, fmnist-mosaic) are read item
by item. ``limit`` scans a seeded random sample instead of every image.

>>> report = inspect_dataset(cfg.data, img_size=224, split="train", out="runs/inspect", limit=100_000)
>>> report["counts"]["missing"], report["long_tail"]["classes_unseen"]

``out`` receives ``report.md`` (tables), ``report.json`` (everything, every problem listed) and the
plots of the ``plot`` function the caller passes (``hvpmtl data inspect`` passes
:func:`hvpmtl.viz.dataset.plot_dataset_report`: ``label_frequency.png``, ``labels_per_image.png``,
``image_sizes.png``); this module draws nothing itself.
"""

from __future__ import annotations

import copy
import io
import json
import random
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hvpmtl.data.decode import DECODE_ERRORS, BadImageError, read_image

__all__ = ["PlotReport", "Scan", "inspect_dataset", "markdown", "scan_dataset", "summarize", "write_report"]

PlotReport = Callable[[dict, Counter, Path], Any]  # (summary, (width, height) -> images, folder): draws the plots


@dataclass
class Scan:
    """What :func:`scan_dataset` read, as running totals (memory grows with the classes, tag pairs
    and distinct sizes, not with the images): images per class, tags per image, images per tag
    pair, readable images per ``(width, height)``, and one dict per problem (``kind``: missing |
    corrupt | too-large, ``where``, ``path``, ``reason``). Problem images count in the tag totals
    (their tags come from the listing)."""

    num_images: int
    classes: list[str]
    scanned: int = 0
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tags_per_image: Counter = field(default_factory=Counter)
    pairs: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    problems: list[dict] = field(default_factory=list)

    def add(self, labels: list[int], size: tuple[int, int] | None, problem: tuple | None) -> None:
        """Count one image."""
        if len(self.class_counts) != len(self.classes):
            self.class_counts = np.zeros(len(self.classes), dtype=np.int64)
        tags = sorted(set(labels))
        self.scanned += 1
        self.class_counts[tags] += 1
        self.tags_per_image[len(tags)] += 1
        self.pairs.update(combinations(tags, 2))
        if size is not None:
            self.sizes[tuple(size)] += 1
        if problem is not None:
            self.problems.append(dict(zip(("kind", "where", "path", "reason"), problem)))


class _Probe(Dataset):
    """Reads one image's tags, size and problem; a Dataset so that DataLoader workers share the work."""

    def __init__(self, dataset: Any, verify: bool):
        self.dataset, self.verify = dataset, verify
        self.files = hasattr(dataset, "paths") and hasattr(dataset, "targets")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self._file(i) if self.files else self._item(i)

    def _item(self, i: int) -> dict:
        try:
            item = self.dataset[i]
        except (BadImageError, OSError, ValueError) as err:
            return {"labels": [], "size": None, "problem": ("corrupt", f"item {i}", f"item {i}", str(err))}
        h, w = item["image"].shape[-2:]
        return {"labels": torch.nonzero(item["labels"]).flatten().tolist(), "size": (int(w), int(h)), "problem": None}

    def _file(self, i: int) -> dict:
        ds = self.dataset
        path = str(ds.paths[i])
        sources = getattr(ds, "sources", None)
        where = sources[i] if sources else path
        out = {"labels": list(ds.targets[i]), "size": None, "problem": None}
        raw = getattr(ds, "raw_bytes", None)  # images kept inside another file (shards)
        if raw is None and not Path(path).is_file():
            out["problem"] = ("missing", where, path, "file not found")
            return out
        try:
            if self.verify:
                load = getattr(ds, "load_image", None)
                image = load(i) if load is not None else read_image(path, getattr(ds, "max_pixels", 0))
                out["size"] = (int(image.shape[-1]), int(image.shape[-2]))
                return out
            data = raw(i) if raw is not None else None
            empty = not data if data is not None else Path(path).stat().st_size == 0
            if empty:
                out["problem"] = ("corrupt", where, path, "empty file (0 bytes)")
                return out
            with Image.open(io.BytesIO(data) if data is not None else path) as image:
                out["size"] = image.size
        except BadImageError as err:
            out["problem"] = ("corrupt", where, path, err.reason)
            return out
        except Image.UnidentifiedImageError:
            out["problem"] = ("corrupt", where, path, "not an image file PIL can identify")
            return out
        except DECODE_ERRORS as err:
            out["problem"] = ("corrupt", where, path, str(err) or type(err).__name__)
            return out
        limit = getattr(ds, "max_pixels", 0)
        w, h = out["size"]
        if limit and w * h > limit:
            out["problem"] = ("too-large", where, path, f"{w}x{h} = {w * h} pixels, over data.max_image_pixels={limit}")
            out["size"] = None
        return out


def _identity(x):
    return x


def scan_dataset(
    dataset: Any, limit: int = 0, verify: bool = False, workers: int = 0, progress: bool = True, seed: int = 0
) -> Scan:
    """Read every image of ``dataset`` (or a seeded random sample of ``limit``), ``workers``
    processes at a time (0: this process), with a progress bar."""
    from tqdm.auto import tqdm

    n = len(dataset)
    indices = sorted(random.Random(seed).sample(range(n), limit)) if 0 < limit < n else list(range(n))
    probe = _Probe(dataset, verify)
    loader = DataLoader(probe, batch_size=None, sampler=indices, num_workers=workers, collate_fn=_identity)
    scan = Scan(num_images=n, classes=list(dataset.classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit is checked above
        for r in tqdm(loader, total=len(indices), unit="img", desc="inspect", disable=not progress):
            scan.add(r["labels"], r["size"], r["problem"])
    return scan


# ----------------------------------------------------------------------------------------------
def _quantiles(counts: dict[int, int]) -> dict:
    """Min, 5th percentile, median, 95th percentile and max of values given as value -> count."""
    if not counts:
        return {}
    values = np.array(sorted(counts))
    cum = np.cumsum([counts[v] for v in values])
    at = [values[np.searchsorted(cum, q * cum[-1], side="left")] for q in (0.05, 0.5, 0.95)]
    return {"min": int(values[0]), "p5": int(at[0]), "median": int(at[1]), "p95": int(at[2]), "max": int(values[-1])}


def summarize(scan: Scan, top: int = 20, img_size: int | None = None, decode_side: int | None = None) -> dict:
    """The report's numbers (JSON-ready) from a :class:`Scan`; ``top`` rows of the class and
    co-occurrence tables. ``decode_side``: what ``data.reduced_decode`` keeps of an image's shorter
    side (images at least twice that are counted: as JPEGs they would decode reduced)."""
    C, freq, per_image = len(scan.classes), scan.class_counts, scan.tags_per_image
    if len(freq) != C:
        freq = np.zeros(C, dtype=np.int64)
    kinds = Counter(p["kind"] for p in scan.problems)
    order = sorted(range(C), key=lambda k: (-freq[k], k))
    seen = freq[freq > 0]
    head = max(1, int(np.ceil(0.1 * C)))
    total = int(freq.sum())
    cooc = [
        {"a": scan.classes[a], "b": scan.classes[b], "images": n,
         "p_b_given_a": round(n / int(freq[a]), 4), "p_a_given_b": round(n / int(freq[b]), 4)}
        for (a, b), n in sorted(scan.pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    ]  # fmt: skip
    widths, heights = Counter(), Counter()
    for (w, h), n in scan.sizes.items():
        widths[w] += n
        heights[h] += n
    readable = sum(scan.sizes.values())
    small = sum(n for (w, h), n in scan.sizes.items() if img_size and min(w, h) < img_size)
    reducible = sum(n for (w, h), n in scan.sizes.items() if decode_side and min(w, h) >= 2 * decode_side)
    n_tags = sum(k * n for k, n in per_image.items())
    return {
        "top": top,
        "counts": {
            "images": scan.num_images,
            "scanned": scan.scanned,
            "sampled": scan.scanned < scan.num_images,
            "classes": C,
            "readable": readable,
            "missing": kinds["missing"],
            "corrupt": kinds["corrupt"],
            "too_large": kinds["too-large"],
            "untagged": per_image.get(0, 0),
        },  # fmt: skip
        "labels_per_image": {
            "mean": round(n_tags / scan.scanned, 4) if scan.scanned else 0.0,
            "median": _quantiles(per_image).get("median", 0),
            "max": max(per_image, default=0),
            "histogram": {str(k): per_image[k] for k in sorted(per_image)},
        },
        "label_frequency": [{"class": scan.classes[k], "images": int(freq[k])} for k in order],
        "long_tail": {
            "label_occurrences": total,
            "classes_seen": int(len(seen)),
            "classes_unseen": int(C - len(seen)),
            "classes_under_10_images": int(((freq > 0) & (freq < 10)).sum()),
            "max_images": int(freq.max()) if C else 0,
            "min_images_seen": int(seen.min()) if len(seen) else 0,
            "median_images": float(np.median(freq)) if C else 0.0,
            "imbalance": round(float(seen.max() / seen.min()), 2) if len(seen) else None,
            "top_10pct_classes": head,
            "top_10pct_share": round(float(np.sort(freq)[::-1][:head].sum() / total), 4) if total else None,
        },  # fmt: skip
        "cooccurrence": cooc,
        "image_sizes": {
            "width": _quantiles(widths),
            "height": _quantiles(heights),
            "img_size": img_size,
            "short_side_below_img_size": small,
            "reduced_decode_side": decode_side,
            "short_side_twice_decode_side": reducible,
            "most_common": [{"size": f"{w}x{h}", "images": n} for (w, h), n in scan.sizes.most_common(10)],
        },
        "problems": scan.problems,
    }


_MD_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "\r": "<br>", "\n": "<br>"})


def md_text(value: Any) -> str:
    """``value`` as inline markdown text: tag and file names are data, so HTML is shown, not
    rendered, and neither ``|`` nor a newline can break a table row."""
    return str(value).replace("\r\n", "\n").translate(_MD_ESCAPES)


def _table(header: list[str], rows: list[list]) -> list[str]:
    def row(cells: list) -> str:
        return "| " + " | ".join(md_text(c) for c in cells) + " |"

    return [row(header), "|" + "|".join("---" for _ in header) + "|", *(row(r) for r in rows)]


def markdown(
    summary: dict, title: str, plots: bool = True, max_problems: int = 50, no_plots: str = "matplotlib missing"
) -> str:
    """``report.md``: the summary as tables, with the plots beside it (``plots=False``: a line saying
    why there are none, ``no_plots``)."""
    c, lpi, tail, sizes = summary["counts"], summary["labels_per_image"], summary["long_tail"], summary["image_sizes"]
    scanned = f"{c['scanned']:,} (a random sample)" if c["sampled"] else f"{c['scanned']:,} (all)"
    lines = [f"# Data report: {md_text(title)}", ""]
    lines += _table(["", ""], [
        ["images", f"{c['images']:,}"], ["scanned", scanned], ["classes", f"{c['classes']:,}"],
        ["readable", f"{c['readable']:,}"], ["missing files", c["missing"]], ["corrupt files", c["corrupt"]],
        ["over the pixel limit", c["too_large"]], ["images without a tag", c["untagged"]],
    ])  # fmt: skip
    problems = summary["problems"]
    lines += ["", f"## Missing or unreadable files ({len(problems)})", ""]
    if problems:
        shown = [[p["kind"], p["where"], p["reason"]] for p in problems[:max_problems]]
        lines += _table(["kind", "where", "reason"], shown)
        if len(problems) > max_problems:
            lines += ["", f"... and {len(problems) - max_problems} more in report.json."]
    else:
        lines.append("None.")
    hist = lpi["histogram"]
    lines += ["", "## Tags per image", "",
              f"mean {lpi['mean']:.2f}, median {lpi['median']:g}, max {lpi['max']}", ""]  # fmt: skip
    lines += _table(["tags", "images"], [[k, v] for k, v in hist.items()])
    lines += [""] + (["![tags per image](labels_per_image.png)", ""] if plots else [])
    lines += ["## Label frequency (long tail)", ""]
    share = f"{100 * tail['top_10pct_share']:.1f} %" if tail["top_10pct_share"] is not None else "—"
    lines += _table(["", ""], [
        ["tag occurrences", f"{tail['label_occurrences']:,}"],
        ["classes seen / unseen", f"{tail['classes_seen']:,} / {tail['classes_unseen']:,}"],
        ["classes with 1-9 images", tail["classes_under_10_images"]],
        ["images per class: max / median / min seen", f"{tail['max_images']:,} / {tail['median_images']:g} / "
                                                      f"{tail['min_images_seen']:,}"],
        ["imbalance (max / min seen)", tail["imbalance"] if tail["imbalance"] is not None else "—"],
        [f"share of occurrences in the top 10 % ({tail['top_10pct_classes']}) classes", share],
    ])  # fmt: skip
    freq, n = summary["label_frequency"], max(1, c["scanned"])
    top = summary["top"]
    lines += ["", f"Most frequent {min(top, len(freq))} classes:", ""]
    lines += _table(["class", "images", "% of images"], [[f["class"], f["images"], f"{100 * f['images'] / n:.2f}"]
                                                        for f in freq[:top]])  # fmt: skip
    if len(freq) > top:
        lines += ["", f"Least frequent {min(top, len(freq) - top)} classes:", ""]
        lines += _table(["class", "images"], [[f["class"], f["images"]] for f in freq[max(top, len(freq) - top) :]])
    lines += [""] + (["![label frequency](label_frequency.png)", ""] if plots else [])
    lines += ["## Tags that occur together", ""]
    if summary["cooccurrence"]:
        lines += _table(["tag a", "tag b", "images", "P(b | a)", "P(a | b)"],
                        [[p["a"], p["b"], p["images"], f"{p['p_b_given_a']:.3f}", f"{p['p_a_given_b']:.3f}"]
                         for p in summary["cooccurrence"]])  # fmt: skip
    else:
        lines.append("No image has two tags.")
    lines += ["", "## Image sizes", ""]
    if sizes["width"]:
        keys = ["min", "p5", "median", "p95", "max"]
        lines += _table(["", *keys], [["width", *(sizes["width"][k] for k in keys)],
                                      ["height", *(sizes["height"][k] for k in keys)]])  # fmt: skip
        if sizes["img_size"]:
            lines += ["", f"{sizes['short_side_below_img_size']:,} images have a short side below the model's "
                          f"input size {sizes['img_size']} (they are upsampled).", ""]  # fmt: skip
        if sizes.get("short_side_twice_decode_side"):
            lines += [f"{sizes['short_side_twice_decode_side']:,} images have a short side of at least twice "
                      f"{sizes['reduced_decode_side']} px: as JPEGs, `data.reduced_decode=true` decodes them at "
                      "1/2 to 1/8 of their size, 1.2-3.5x faster (docs/performance.md).", ""]  # fmt: skip
        lines += ["Most common sizes:", ""]
        lines += _table(["width x height", "images"], [[m["size"], m["images"]] for m in sizes["most_common"]])
    else:
        lines.append("No readable image.")
    lines += [""] + (["![image sizes](image_sizes.png)", ""] if plots else [f"(plots skipped: {no_plots})"])
    return "\n".join(lines) + "\n"


def write_report(
    summary: dict, scan: Scan, out: str | Path, title: str = "data set", plot: PlotReport | None = None
) -> Path:
    """``report.json``, ``report.md`` and the plots ``plot(summary, scan.sizes, out)`` draws (the CLI
    passes :func:`hvpmtl.viz.dataset.plot_dataset_report`) into folder ``out``; without ``plot``, or
    when it raises ``ImportError`` (no matplotlib; with a warning), no plots. Returns report.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"title": title, **summary}, indent=1) + "\n")
    plots, why = plot is not None, "no plot function given"
    if plot is not None:
        try:
            plot(summary, scan.sizes, out)
        except ImportError as err:
            warnings.warn(f"no plots ({err}): pip install 'hvpmtl[viz]' (matplotlib)", stacklevel=2)
            plots, why = False, "matplotlib missing"
    path = out / "report.md"
    path.write_text(markdown(summary, title, plots, no_plots=why))
    return path


def inspect_dataset(
    cfg_data: Any,
    img_size: int,
    split: str = "train",
    out: str | Path = "inspect",
    limit: int = 0,
    verify: bool = False,
    top: int = 20,
    workers: int = 0,
    progress: bool = True,
    plot: PlotReport | None = None,
) -> dict:
    """Build ``split`` of the data set ``cfg_data`` describes (missing files allowed, so that they
    can be listed), scan it and write the report into ``out`` (plots by ``plot``, see
    :func:`write_report`); returns the summary."""
    from hvpmtl.data import build_dataset
    from hvpmtl.data.views import decode_side

    cfg = copy.deepcopy(cfg_data)
    cfg.check_files = False
    dataset = build_dataset(cfg, img_size, split)
    scan = scan_dataset(dataset, limit, verify, workers, progress)
    summary = summarize(scan, top, img_size, decode_side(img_size, cfg.crop_scale, cfg.crop_ratio))
    source = getattr(dataset, "manifest", None) or getattr(dataset, "origin", None) or cfg.dataset
    write_report(summary, scan, out, f"{cfg.dataset} {split} ({source})", plot)
    return summary
