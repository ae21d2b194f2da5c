"""File latency and ``data.io_threads``: one loader worker's img/s when every file read waits.

Network file systems and object-store mounts answer each file after some milliseconds. A worker
that reads its batch one file after another waits that long per image; with ``data.io_threads``
it reads the batch's files concurrently, then decodes them in order. The latency is simulated (a
sleep in each ``open`` of an image file, whoever opens it), so the numbers isolate the waiting,
not a particular file system.

    python benchmarks/io_latency.py --latency-ms 0 2 10 --io-threads 0 8 32
"""

from __future__ import annotations

import argparse
import builtins
import io
import tempfile
import time
from pathlib import Path

import torch
from input_pipeline import write_jpeg_manifest, write_rows

import hvpmtl
from hvpmtl.data import build_pretrain_dataset

real_open = builtins.open


def worker_rate(views, batch: int, batches: int) -> float:
    """img/s of ``__getitems__`` (what one DataLoader worker does per batch) over ``batches`` batches."""
    keys = [[(b * batch + j) % len(views) for j in range(batch)] for b in range(batches)]
    views.__getitems__(keys[0])  # the thread pool starts
    t0 = time.perf_counter()
    for k in keys:
        views.__getitems__(k)
    return batch * batches / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper-vit-b", help="its view size and crops are used (no model)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 2.0, 10.0])
    p.add_argument("--io-threads", type=int, nargs="+", default=[0, 8, 32])
    p.add_argument("--augment-on", default="device", choices=["cpu", "device"], help="what a worker makes per sample")
    p.add_argument("--batch", type=int, default=32, help="a worker's batch")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--out", default="runs/benchmarks/io_latency.csv")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_jpeg_manifest(Path(tmp), args.batch * args.batches, (500, 375), files=args.batch)
        images = str(Path(tmp) / "img")
        for latency in args.latency_ms:

            def slow_open(file, *a, _wait: float = latency / 1000, **kw):  # every open of an image waits
                if str(file).startswith(images):
                    time.sleep(_wait)
                return real_open(file, *a, **kw)

            builtins.open = io.open = slow_open  # PIL opens with the one, pathlib with the other
            try:
                for threads in args.io_threads:
                    cfg = hvpmtl.load_config(args.preset, [
                        "data.dataset=manifest", f"data.manifest={manifest}", f"data.root={tmp}", "data.num_classes=10",
                        f"data.io_threads={threads}", f"data.augment_on={args.augment_on}", "train.output_dir=",
                        "data.check_files=false",
                    ])  # fmt: skip
                    rate = worker_rate(build_pretrain_dataset(cfg), args.batch, args.batches)
                    rows.append({"latency_ms": latency, "io_threads": threads, "img_per_s": round(rate, 1)})
                    print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
            finally:
                builtins.open = io.open = real_open
    print(f"\n{args.preset}, augment_on={args.augment_on}, 500x375 JPEGs, batch {args.batch}: one worker's img/s")
    threads = args.io_threads
    print("| latency per file | " + " | ".join(f"io_threads={t}" for t in threads) + " |")
    print("|---|" + "---:|" * len(threads))
    for latency in args.latency_ms:
        rates = [r["img_per_s"] for r in rows if r["latency_ms"] == latency]
        print(f"| {latency:g} ms | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
