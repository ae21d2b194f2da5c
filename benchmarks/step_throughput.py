"""Training-step throughput of the HVPMTL model (forward + backward + AdamW + EMA), in img/s.

Measures the presets and the view routing (two shared backbone passes vs. a third pass for
SwAV on clean views) and the cost of each task, on whatever device is available.

    python benchmarks/step_throughput.py --presets cpu-tiny cpu-swin-tiny --batch 64 --steps 10
    python benchmarks/step_throughput.py --presets paper-vit-b --batch 128 --device cuda --precision bf16

Writes a CSV (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import time

import torch

import hvpmtl

VARIANTS = {
    "all tasks, shared passes": [],
    "all tasks, SwAV on clean views": ["tasks.routing.swav_masked=false"],
    "no MLC": ["tasks.mlc.weight=0"],
    "no SwAV": ["tasks.swav.weight=0"],
    "no MIM": ["tasks.mim.weight=0"],
    "no MD": ["tasks.distill.weight=0"],
    "MIM only": ["tasks.mlc.weight=0", "tasks.swav.weight=0", "tasks.distill.weight=0"],
}


def measure(cfg, batch_size: int, steps: int, warmup: int, device: str, precision: str, num_classes: int) -> float:
    torch.manual_seed(0)
    model = hvpmtl.build(cfg, num_classes=num_classes).to(device).train()
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    s = cfg.backbone.img_size
    batch = {
        "views": [torch.randn(batch_size, 3, s, s, device=device) for _ in range(2)],
        "mask": hvpmtl.mask_generator(cfg)(batch_size).to(device),
        "labels": (torch.rand(batch_size, num_classes, device=device) > 0.8).float(),
    }
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.after_step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["cpu-tiny", "cpu-swin-tiny"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default="benchmarks/step_throughput.csv")
    args = p.parse_args()

    rows = []
    for preset in args.presets:
        for name in args.variants:
            cfg = hvpmtl.load_config(preset, VARIANTS[name])
            ips = measure(cfg, args.batch, args.steps, args.warmup, args.device, args.precision, args.classes)
            rows.append({"preset": preset, "variant": name, "batch": args.batch, "device": args.device,
                         "precision": args.precision, "img_per_s": round(ips, 1)})
            print(f"{preset:16s} {name:32s} {ips:8.1f} img/s", flush=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| preset | variant | img/s |\n|---|---|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['variant']} | {r['img_per_s']} |")


if __name__ == "__main__":
    main()
