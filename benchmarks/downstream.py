"""The downstream results of docs/results.md: pre-train, then evaluate every backbone the same way.

Pre-trains the default CPU model (``cpu-tiny``) on ``fmnist-mosaic`` (train split only) twice on
the same budget (steps and images): all four objectives (HVP-MTL), and supervised only (MLC
only). Then each of the two, and the same backbone at its random initialisation, goes through
k-NN, linear probe and fine-tuning on single Fashion-MNIST items (train -> official test
items), Mask R-CNN detection and UperNet segmentation on the built-in synthetic scenes. A raw-pixel
logistic regression is the reference for the frozen-feature rows. Every step is one ``hvpmtl``
command (printed before it runs), so any cell can be re-run by hand; finished steps are skipped
when the script is run again.

    python benchmarks/downstream.py                      # everything (~2 h on 2 CPU cores)
    python benchmarks/downstream.py --only knn linprobe  # some commands (or: features, the probe-feature table)
    python benchmarks/downstream.py --table              # just print the table from the JSON files
    python benchmarks/downstream.py --root runs/results-2k \
        --pretrain data.train_size=64000 train.epochs=2 train.precision=bf16   # 2,000 steps (a GPU: ~5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRETRAIN = {
    "hvp-mtl": [],
    "mlc-only": ["tasks.swav.weight=0", "tasks.mim.weight=0", "tasks.distill.weight=0"],
}
COMMON = ["data.dataset=fmnist-mosaic", "eval.knn_every=100", "eval.knn_feature=mean"]
FEATURES = ["-c", "fmnist", "train_images=20000"]  # 20,000 train items as bank / probe set, all 10,000 test items
DOWNSTREAM = {  # command -> (data sets, arguments)
    "knn": (["fmnist"], FEATURES),
    "linprobe": (["fmnist"], FEATURES),
    "finetune": (["fmnist"], ["-c", "cpu-finetune"]),
    "detect": (["fmnist-mosaic", "synthetic"], ["-c", "cpu-maskrcnn"]),
    "segment": (["fmnist-mosaic", "synthetic"], ["-c", "cpu-upernet"]),
}
# which frozen feature the probe defaults to: every kind on a single-label and a multi-label set
# (smaller subsets; results in <run>/eval-features/)
FEATURE_CHOICE = {
    "fmnist": ["-c", "fmnist", "train_images=5000", "eval_images=2000"],
    "synthetic": ["data.dataset=synthetic", "train_images=3000", "eval_images=1000"],
}
BACKBONES = {"HVP-MTL (4 objectives)": ("hvp-mtl", []), "supervised only (MLC)": ("mlc-only", []),
             "random init": ("hvp-mtl", ["--random-init"])}  # fmt: skip


def sh(args: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "hvpmtl", *args]
    print("$ hvpmtl " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}); see {log}")
    return time.perf_counter() - t0


def result(root: Path, command: str, run: str, who: str, data: str) -> dict | None:
    suffix = {"knn": "-mean", "linprobe": "-both"}.get(command, "")  # their default features
    path = root / run / "eval" / f"{command}-{data}-{who}{suffix}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(root: Path) -> str:
    head = ("| backbone | k-NN top-1 | linear probe top-1 | fine-tune top-1 | box AP | mask AP | mIoU "
            "| box AP | mask AP | mIoU |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    rows = ["(detection and segmentation: fmnist-mosaic, then synthetic scenes)", head]
    keys = [("knn", "fmnist", "top1"), ("linprobe", "fmnist", "top1"), ("finetune", "fmnist", "top1")]
    for data in DOWNSTREAM["detect"][0]:
        keys += [("detect", data, "box_AP"), ("detect", data, "mask_AP"), ("segment", data, "mIoU")]
    for name, (run, flags) in BACKBONES.items():
        who = "random-init" if flags else "student"
        cells = []
        for command, data, metric in keys:
            r = result(root, command, run, who, data)
            cells.append(f"{r['metrics'][metric]:.1f}" if r else "—")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    px = root / "hvp-mtl" / "eval" / "linprobe-fmnist-random-init-pixels.json"
    if px.is_file():
        value = json.loads(px.read_text())["metrics"]["top1"]
        rows.append(f"| raw pixels (logistic regression) | — | {value:.1f} |" + " — |" * (len(keys) - 2))
    return "\n".join(rows)


def feature_table(root: Path) -> str:
    rows = [
        "| data (metric) | backbone | mean of feature map | pooled (class token) | both |",
        "|---|---|---:|---:|---:|",
    ]
    for data in FEATURE_CHOICE:
        for name, (run, flags) in BACKBONES.items():
            who = "random-init" if flags else "student"
            cells, metric = [], "top1" if data == "fmnist" else "mAP"
            for kind in ("mean", "pooled", "both"):
                path = root / run / "eval-features" / f"linprobe-{data}-{who}-{kind}.json"
                cells.append(f"{json.loads(path.read_text())['metrics'][metric]:.1f}" if path.is_file() else "—")
            rows.append(f"| {data} ({metric}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/results", help="where the runs go (default runs/results)")
    p.add_argument("--only", nargs="*", default=None, help="downstream commands to run (default: all)")
    p.add_argument("--table", action="store_true", help="only print the table")
    p.add_argument("--pretrain", nargs="*", default=[], help="extra key=value overrides of both pre-trainings")
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if not args.table:
        os.environ.setdefault("OMP_NUM_THREADS", "2")
        log = root / "log.txt"
        times = {}
        for run, extra in PRETRAIN.items():
            if not (root / run / "backbone.safetensors").is_file():
                times[f"pretrain {run}"] = sh(["pretrain", "-c", "cpu-tiny", f"train.output_dir={root / run}",
                                               "train.resume=auto", *COMMON, *extra, *args.pretrain], log)  # fmt: skip
        for command, (datasets, cargs) in DOWNSTREAM.items():
            if args.only is not None and command not in args.only:
                continue
            for data in datasets:
                dargs = [] if data == "fmnist" else [f"data.dataset={data}"]
                for _, (run, flags) in BACKBONES.items():
                    who = "random-init" if flags else "student"
                    if result(root, command, run, who, data) is None:
                        cmd = [command, str(root / run), *flags, *cargs, *dargs]
                        times[f"{command} {data} {run} {who}"] = sh(cmd, log)
        if (args.only is None or "linprobe" in args.only) and not (
            root / "hvp-mtl/eval/linprobe-fmnist-random-init-pixels.json"
        ).is_file():
            times["linprobe pixels"] = sh(
                ["linprobe", str(root / "hvp-mtl"), "--random-init", *FEATURES, "probe.feature=pixels"], log
            )
        if args.only is None or "features" in args.only:
            for data, fargs in FEATURE_CHOICE.items():
                for _, (run, flags) in BACKBONES.items():
                    who = "random-init" if flags else "student"
                    for kind in ("mean", "pooled", "both"):
                        out = root / run / "eval-features"
                        if not (out / f"linprobe-{data}-{who}-{kind}.json").is_file():
                            args_ = ["linprobe", str(root / run), *flags, *fargs, f"probe.feature={kind}"]
                            times[f"linprobe {data} {run} {who} {kind}"] = sh([*args_, f"run.output_dir={out}"], log)
        for k, v in times.items():
            print(f"{k:40s} {v / 60:6.1f} min")
    print(table(root))
    print()
    print(feature_table(root))


if __name__ == "__main__":
    main()
