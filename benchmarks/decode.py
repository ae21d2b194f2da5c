"""Reduced JPEG decoding (``data.reduced_decode``): cost per pre-training sample and what it changes.

For JPEGs of each ``--sizes`` (generated like ``input_pipeline.py``'s), in one process:

* decode: ``read_image`` at full size and reduced to what the views need
  (``reduced_decode_side``: 316 px a side for 224-pixel views at the default crop scale);
* sample: a whole pre-training sample as a loader worker makes it (``PretrainViews``: decode and
  both views; ``--augment-on device``: decode and the two uint8 crops);
* fidelity: the same relative crops (scale and ratio as the views draw them) of the full and of
  the reduced decode, each resized to the view size with antialiasing; mean absolute difference
  (0-255) and PSNR between them. For scale, the same for the full decode resized (antialiased)
  to the reduced size first, which is what a data set resized offline gives.

    python benchmarks/decode.py --sizes 500x375 1024x768 2048x1536 4000x3000 --images 8
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from input_pipeline import write_jpeg_manifest, write_rows
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import hvpmtl
from hvpmtl.data import (
    ImageLoading,
    ManifestImages,
    PretrainViews,
    build_view_transform,
    read_image,
    reduced_decode_side,
)


def _median_ms(fn, items, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        for item in items:
            t0 = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def fidelity(full: torch.Tensor, reduced: torch.Tensor, size: int, scale, ratio, crops: int, seed: int) -> tuple:
    """Mean absolute difference and PSNR between the same relative crops of two decodes."""
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(crops):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        top, left, h, w = v2.RandomResizedCrop.get_params(full, scale=list(scale), ratio=list(ratio))  # full size
        fy, fx = reduced.shape[1] / full.shape[1], reduced.shape[2] / full.shape[2]
        a = TF.resized_crop(full, top, left, h, w, [size, size], antialias=True)
        b = TF.resized_crop(reduced, round(top * fy), round(left * fx), round(h * fy), round(w * fx), [size, size],
                            antialias=True)  # fmt: skip
        diffs.append((a.float() - b.float()).abs())
    d = torch.stack(diffs)
    mse = float((d**2).mean())
    return float(d.mean()), 10 * math.log10(255**2 / mse) if mse > 0 else math.inf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper-vit-b", help="its view size and crop scale are used (no model)")
    p.add_argument("--sizes", nargs="+", default=["500x375", "1024x768", "2048x1536", "4000x3000"])
    p.add_argument("--images", type=int, default=8, help="JPEGs per size")
    p.add_argument("--repeat", type=int, default=3, help="passes over the images per timing")
    p.add_argument("--augment-on", default="cpu", choices=["cpu", "device"], help="what a worker makes per sample")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/benchmarks/decode.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = hvpmtl.load_config(args.preset, [f"data.augment_on={args.augment_on}", "data.reduced_decode=true"])
    side, d = reduced_decode_side(cfg), cfg.data
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            w, h = (int(v) for v in size.lower().split("x"))
            folder = Path(tmp) / size
            manifest = write_jpeg_manifest(folder, args.images, (w, h), files=args.images)
            paths = sorted((folder / "img").glob("*.jpg"))
            row = {"size": size, "megapixels": round(w * h / 1e6, 2), "min_side": side}
            for name, min_side in (("full", 0), ("reduced", side)):
                row[f"decode_ms_{name}"] = round(_median_ms(lambda q, m=min_side: read_image(q, min_side=m), paths,
                                                            args.repeat), 2)  # fmt: skip
                base = ManifestImages(manifest, root=folder, loading=ImageLoading(decode_min_side=min_side))
                views = PretrainViews(base, build_view_transform(cfg), seed=0)
                row[f"sample_ms_{name}"] = round(_median_ms(lambda i, v=views: v[(i, 0)], range(len(paths)),
                                                            args.repeat), 2)  # fmt: skip
            row["decoded"] = "x".join(str(s) for s in read_image(paths[0], min_side=side).shape[:0:-1])
            row["sample_speedup"] = round(row["sample_ms_full"] / row["sample_ms_reduced"], 2)
            for name, shrink in (("", False), ("_resized", True)):
                stats = []
                for i, q in enumerate(paths):
                    full, reduced = read_image(q), read_image(q, min_side=side)
                    if shrink:  # the full decode resized to the reduced decode's size instead
                        reduced = TF.resize(full, list(reduced.shape[1:]), antialias=True)
                    stats.append(fidelity(full, reduced, cfg.backbone.img_size, d.crop_scale, d.crop_ratio, 4, i))
                row[f"mad{name}"] = round(statistics.mean(s[0] for s in stats), 2)
                row[f"psnr_db{name}"] = round(statistics.mean(s[1] for s in stats), 1)
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"\n{args.preset}: views {cfg.backbone.img_size} px, crop scale {tuple(d.crop_scale)}, "
          f"augment_on={args.augment_on}, {args.threads} thread(s); ms per image, median")  # fmt: skip
    print(
        "| JPEG | decoded at | decode full / reduced (ms) | sample full / reduced (ms) | speed-up | "
        "MAD / PSNR, reduced | MAD / PSNR, resized offline |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['decoded']} | {r['decode_ms_full']} / {r['decode_ms_reduced']} | "
              f"{r['sample_ms_full']} / {r['sample_ms_reduced']} | {r['sample_speedup']}x | {r['mad']} / "
              f"{r['psnr_db']} dB | {r['mad_resized']} / {r['psnr_db_resized']} dB |")  # fmt: skip
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
