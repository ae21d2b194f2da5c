"""The plots of ``hvpmtl data inspect`` (matplotlib, the ``viz`` extra), 800 x 450 pixels each.

* ``label_frequency.png``: images per class, classes sorted from the most frequent, log scale
  (the long tail; unseen classes are left out and counted in the title);
* ``labels_per_image.png``: how many images have 0, 1, 2, ... tags;
* ``image_sizes.png``: width and height histograms, and the aspect ratio (width / height).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGSIZE, DPI = (8.0, 4.5), 100  # 800 x 450 pixels
NAMED_BARS = 40  # up to this many classes, bars carry the class names


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def plot_label_frequency(frequency: list[dict], path: str | Path) -> Path:
    """``frequency``: ``[{"class", "images"}]`` sorted by ``images``, most frequent first."""
    fig = _figure()
    ax = fig.add_subplot()
    seen = [f for f in frequency if f["images"] > 0]
    counts = np.array([f["images"] for f in seen])
    if len(seen) <= NAMED_BARS:
        ax.bar(range(len(seen)), counts, color="tab:blue")
        ax.set_xticks(range(len(seen)), [f["class"] for f in seen], rotation=60, ha="right", fontsize=7)
    else:
        ax.plot(np.arange(1, len(seen) + 1), counts, color="tab:blue", linewidth=1.2)
        ax.set_xlabel("class rank (most frequent first)")
    if len(seen):
        ax.set_yscale("log")
    unseen = len(frequency) - len(seen)
    ax.set_title(f"images per class: {len(seen)} classes seen" + (f", {unseen} unseen" if unseen else ""), fontsize=10)
    ax.set_ylabel("images (log scale)")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path)
    return Path(path)


def plot_labels_per_image(histogram: dict[str, int], path: str | Path) -> Path:
    """``histogram``: number of tags (as a string) -> images."""
    fig = _figure()
    ax = fig.add_subplot()
    ks = sorted(int(k) for k in histogram)
    ax.bar(ks, [histogram[str(k)] for k in ks], color="tab:green")
    ax.set_xlabel("tags per image")
    ax.set_ylabel("images")
    ax.set_title("tags per image", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path)
    return Path(path)


def plot_image_sizes(sizes: dict[tuple[int, int], int], path: str | Path, img_size: int | None = None) -> Path:
    """``sizes``: ``(width, height)`` -> number of readable images; ``img_size`` is marked if given."""
    fig = _figure()
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if sizes:
        wh = np.array(list(sizes), dtype=np.float64)
        n = np.array(list(sizes.values()), dtype=np.float64)
        bins = np.histogram_bin_edges(wh, bins=30)
        left.hist(wh[:, 0], bins=bins, weights=n, alpha=0.6, label="width", color="tab:blue")
        left.hist(wh[:, 1], bins=bins, weights=n, alpha=0.6, label="height", color="tab:orange")
        if img_size:
            left.axvline(img_size, color="black", linestyle="--", linewidth=1, label=f"img_size {img_size}")
        left.legend(fontsize=7)
        right.hist(wh[:, 0] / wh[:, 1], bins=40, weights=n, color="tab:purple")
    else:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no readable image", ha="center", va="center", transform=ax.transAxes)
    left.set_title("width and height (pixels)", fontsize=10)
    right.set_title("aspect ratio (width / height)", fontsize=10)
    for ax in (left, right):
        ax.set_ylabel("images")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path)
    return Path(path)


def plot_dataset_report(summary: dict, sizes: dict[tuple[int, int], int], out: str | Path) -> list[Path]:
    """The three plots of an inspect summary (and its ``(width, height) -> images`` counts) into ``out``."""
    out = Path(out)
    return [
        plot_label_frequency(summary["label_frequency"], out / "label_frequency.png"),
        plot_labels_per_image(summary["labels_per_image"]["histogram"], out / "labels_per_image.png"),
        plot_image_sizes(sizes, out / "image_sizes.png", summary["image_sizes"].get("img_size")),
    ]
