"""Cost of one training step, side by side: supervised baseline, HVP-MTL, each task alone, a naive variant.

One process measures, per preset and variant (see ``step_variants.py`` for what each is and what
a step does): img/s, GFLOP per image, achieved TFLOP/s, MFU against a matmul peak measured in
the same run, and peak memory; eager and (``--compile``) compiled. Prints a markdown table and
writes a CSV.

    python benchmarks/step_cost.py --presets cpu-micro cpu-tiny --threads 1 --out benchmarks/step_cost_cpu.csv
    python benchmarks/step_cost.py --presets paper-vit-b paper-swin-b --device cuda --precision bf16 \\
        --batch 128 --compile --profile hvp-mtl
    python benchmarks/step_cost.py --presets paper-vit-b --flops-only   # FLOPs on the meta device, no timing

* Time: each step is timed alone (device synchronised), by the wall clock and by the process's
  CPU time; the tables give medians. On a CPU host shared with other jobs, run ``--threads 1``:
  the CPU time then stays close to the step's time on an idle machine, while the wall clock
  grows with the load. ``--interleave`` (default on CPU) builds every variant first and takes the
  timed steps in turns, so that a change of load falls on all variants alike.
* FLOPs: one forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
  meta device (matmuls, convolutions, attention; teacher included; the attention backward
  without the fused kernels' recomputation, i.e. model FLOPs; the optimiser's element-wise work
  is not counted).
* MFU = achieved FLOP/s / the best of several square matmuls in the step's precision
  (``--peak-size``), timed in the same process just before the variants; on CPU also by CPU
  time (both FLOP/s from the process's CPU time), the figure to read on a shared host.
* Memory: ``state`` = bytes of weights and buffers (teacher included), optimiser state and
  inputs, counted from the tensors. ``peak`` = memory in use after warm-up minus before the
  build, plus the most one step adds: CUDA's allocator counters (``max_memory_allocated``); on
  CPU the resident set size (``/proc/self/statm``, sampled every 5 ms), only without
  ``--interleave`` and approximate (the allocator keeps freed memory).
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import math
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from step_variants import (
    DEFAULT_VARIANTS,
    DTYPES,
    VARIANTS,
    build_variant,
    compile_model,
    count_flops,
    make_batch,
    make_step,
)

import hvpmtl
from hvpmtl.engine.checkpoint import atomic_write

PAPER_CLASSES = 11_166  # the paper's tag vocabulary


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, precision: str, size: int, repeats: int = 10) -> tuple[float, float]:
    """Best FLOP/s of ``size x size`` matmuls in ``precision`` on ``device`` (4 per timing), by
    the wall clock and by this process's CPU time (NaN on CUDA)."""
    a = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    wall = cpu = math.inf
    for i in range(repeats + 2):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(4):
            a @ b
        _sync(device)
        if i >= 2:  # the first two warm up
            wall = min(wall, (time.perf_counter() - t0) / 4)
            cpu = min(cpu, (time.process_time() - c0) / 4)
    flop = 2 * size**3
    return flop / wall, flop / cpu if device == "cpu" else math.nan


def _rss() -> int | None:
    """Resident set size in bytes (Linux), or None where ``/proc`` does not exist."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PeakMemory:
    """Peak memory since :meth:`reset`, relative to :meth:`now`: CUDA's allocator counters, or
    (``sample_rss``) the CPU resident set size sampled every 5 ms by a thread; NaN otherwise."""

    def __init__(self, device: str, sample_rss: bool):
        self.device, self._peak = device, 0
        self._stop = threading.Event()
        self.on = device == "cuda" or (sample_rss and _rss() is not None)
        if self.on and device != "cuda":
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss())

    def now(self) -> float:
        if not self.on:
            return math.nan
        return float(torch.cuda.memory_allocated() if self.device == "cuda" else _rss())

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.on:
            self._peak = _rss()

    def peak(self) -> float:
        if not self.on:
            return math.nan
        return float(torch.cuda.max_memory_allocated()) if self.device == "cuda" else max(self._peak, _rss())

    def close(self) -> None:
        self._stop.set()


class Run:
    """One variant being timed: built, compiled if asked, warmed up; :meth:`step` times one step,
    by the wall clock and by this process's CPU time (which other jobs on the host barely change
    when PyTorch runs one thread).

    Memory: ``state`` counts the bytes of weights, buffers, optimiser state and inputs (exact);
    the peak is the memory in use after warm-up minus before the build, plus the most one step
    adds on top.
    """

    def __init__(self, preset: str, variant: str, args: argparse.Namespace, compiled: bool, memory: PeakMemory):
        self.args, self.memory = args, memory
        gc.collect()
        before = memory.now()
        torch.manual_seed(0)
        C = num_classes(preset, args)
        model, cfg = build_variant(preset, variant, C, args.device, args.set)
        if compiled:
            compile_model(model, args.compile_scope)
        self.train_step = make_step(model, cfg, make_batch(cfg, args.batch, C, args.device), args.device,
                                    args.precision)  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            self.train_step()
        _sync(args.device)
        self.warmup_s = time.perf_counter() - t0
        self.held = memory.now() - before
        self.state_mib = self.train_step.state_bytes() / 2**20
        self.transient, self.wall, self.cpu = 0.0, [], []

    def step(self) -> None:
        base = self.memory.now()
        self.memory.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        self.train_step()
        _sync(self.args.device)
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        self.transient = max(self.transient, self.memory.peak() - base)

    def free(self) -> None:
        self.train_step = None

    @property
    def peak_mib(self) -> float:
        return (self.held + self.transient) / 2**20


def num_classes(preset: str, args: argparse.Namespace) -> int:
    """``--classes``, else the preset's ``data.num_classes``, else the paper's vocabulary for
    ``paper-*`` presets and 10 for the others."""
    if args.classes is not None:
        return args.classes
    n = hvpmtl.load_config(preset, args.set).data.num_classes
    return n or (PAPER_CLASSES if preset.startswith("paper") else 10)


def variant_flops(preset: str, variant: str, args: argparse.Namespace) -> int:
    """FLOPs of one forward + backward at ``args.batch``, counted on the meta device (no memory)."""
    C = num_classes(preset, args)
    model, cfg = build_variant(preset, variant, C, "meta", args.set)
    return count_flops(model, make_batch(cfg, args.batch, C, "meta"))


def measure(preset: str, args: argparse.Namespace, memory: PeakMemory) -> list[dict]:
    """One row per variant (and mode) of ``preset``. Interleaved (``--interleave``): every variant
    is built first, then the timed steps go round them, so a change of load on the host falls on
    all alike; otherwise one variant after the other, each freed before the next is built."""
    flops = {v: variant_flops(preset, v, args) for v in args.variants}
    if args.flops_only:
        return [_row(preset, v, args, False, flops[v], None) for v in args.variants]
    keys = [(v, c) for c in ((False, True) if args.compile else (False,)) for v in args.variants]
    runs: dict[tuple[str, bool], Run] = {}
    if args.interleave:
        runs = {(v, c): Run(preset, v, args, c, memory) for v, c in keys}
        for _ in range(args.steps):
            for run in runs.values():
                run.step()
    else:
        for v, c in keys:
            runs[v, c] = run = Run(preset, v, args, c, memory)
            for _ in range(args.steps):
                run.step()
            run.free()
    rows = [_row(preset, v, args, c, flops[v], runs[v, c]) for v, c in keys]
    for r in rows:
        print(_progress_line(r), flush=True)
    return rows


def _progress_line(r: dict) -> str:
    return (f"{r['preset']:14s} {r['variant']:18s} {r['mode']:8s} {r['img_per_s']:8.1f} img/s "
            f"{r['gflop_per_img']:8.3g} GFLOP/img  MFU {r['mfu_pct']:5.1f} %")  # fmt: skip


def _row(preset: str, variant: str, args: argparse.Namespace, compiled: bool, flops: int, run: Run | None) -> dict:
    wall = statistics.median(run.wall) if run else math.nan
    cpu = statistics.median(run.cpu) if run else math.nan
    return {
        "preset": preset, "variant": variant, "mode": f"compiled:{args.compile_scope}" if compiled else "eager",
        "device": args.device, "precision": args.precision, "batch": args.batch,
        "classes": num_classes(preset, args), "img_per_s": args.batch / wall, "step_ms": 1e3 * wall,
        "cpu_ms": 1e3 * cpu, "gflop_per_img": flops / args.batch / 1e9, "tflop_per_s": flops / wall / 1e12,
        "mfu_pct": 100 * flops / wall / 1e12 / args.peak_tflops,
        "cpu_time_mfu_pct": 100 * flops / cpu / 1e12 / args.peak_cpu_tflops if args.device == "cpu" else math.nan,
        "state_mib": run.state_mib if run else math.nan, "peak_mib": run.peak_mib if run else math.nan,
        "warmup_s": run.warmup_s if run else math.nan,
        "peak_tflop_per_s": args.peak_tflops, "peak_cpu_time_tflop_per_s": args.peak_cpu_tflops,
    }  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """Step time and FLOPs of each row relative to the supervised row of its preset and mode."""
    base = {(r["preset"], r["mode"]): r for r in rows if r["variant"] == "supervised"}
    for r in rows:
        b = base.get((r["preset"], r["mode"]))
        r["time_vs_supervised"] = r["step_ms"] / b["step_ms"] if b else float("nan")
        r["cpu_time_vs_supervised"] = r["cpu_ms"] / b["cpu_ms"] if b else float("nan")
        r["flop_vs_supervised"] = r["gflop_per_img"] / b["gflop_per_img"] if b else float("nan")


COLUMNS = [  # (key, header, format)
    ("preset", "preset", "{}"), ("variant", "variant", "{}"), ("mode", "mode", "{}"),
    ("img_per_s", "img/s", "{:.1f}"), ("step_ms", "step ms", "{:.0f}"), ("gflop_per_img", "GFLOP/img", "{:.3g}"),
    ("tflop_per_s", "TFLOP/s", "{:.3g}"), ("mfu_pct", "MFU %", "{:.1f}"),
    ("cpu_time_mfu_pct", "MFU % (CPU time)", "{:.1f}"),
    ("state_mib", "state MiB", "{:.0f}"), ("peak_mib", "peak MiB", "{:.0f}"),
    ("time_vs_supervised", "time / sup.", "{:.2f}x"), ("cpu_time_vs_supervised", "CPU time / sup.", "{:.2f}x"),
    ("flop_vs_supervised", "FLOP / sup.", "{:.2f}x"),
]  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if f == "{}" else "---:" for _, _, f in COLUMNS) + "|"]  # fmt: skip
    for r in rows:
        cells = ["—" if isinstance(r.get(k), float) and r[k] != r[k] else f.format(r.get(k, "")) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    def write(f) -> None:
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
        f.write(text.getvalue().encode())

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def profile(preset: str, variant: str, args: argparse.Namespace, steps: int = 3) -> str:
    """torch.profiler's table of the ops that take the most (self) time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    C = num_classes(preset, args)
    model, cfg = build_variant(preset, variant, C, args.device, args.set)
    if args.compile:
        compile_model(model, args.compile_scope)
    step = make_step(model, cfg, make_batch(cfg, args.batch, C, args.device), args.device, args.precision)
    for _ in range(max(args.warmup, 1)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(args.device)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["cpu-micro", "cpu-tiny"])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median taken; default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; compiling happens here)")
    p.add_argument("--classes", type=int, default=None,
                   help=f"label vocabulary C (default: data.num_classes, else {PAPER_CLASSES:,} for paper-* "
                        f"presets as in the paper, else 10)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (torch.set_num_threads; default: PyTorch's). On a host shared with other "
                   "jobs, 1 thread can be several times faster than 2")  # fmt: skip
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="build every variant first and time the steps in turns (default: on for CPU, where other "
                   "jobs change the load; off for CUDA, where all variants may not fit at once)")  # fmt: skip
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every preset")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs (on the meta device) and time nothing")
    p.add_argument("--compile", action="store_true", help="also time each variant compiled (torch.compile)")
    p.add_argument(
        "--compile-scope",
        default="backbone",
        choices=["backbone", "model"],
        help="with --compile: the backbones as train.compile does (default), or the whole forward",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="side of the square matmuls that measure the peak (default 2048 on CPU, 8192 on CUDA)",
    )
    p.add_argument("--out", default="runs/benchmarks/step_cost.csv", help="CSV to write (default under runs/)")
    p.add_argument(
        "--profile",
        metavar="VARIANT",
        choices=list(VARIANTS),
        help="print torch.profiler's top ops for this variant (first preset)",
    )
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--trace", default=None, help="with --profile: also write a Chrome trace here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.interleave is None:
        args.interleave = args.device == "cpu"
    try:
        for preset in args.presets:
            hvpmtl.load_config(preset, args.set)
    except (hvpmtl.ConfigError, ValueError, FileNotFoundError) as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.peak_size or (8192 if args.device == "cuda" else 2048)
    peaks = (math.nan, math.nan) if args.flops_only else matmul_peak(args.device, args.precision, size)
    args.peak_tflops, args.peak_cpu_tflops = (x / 1e12 for x in peaks)
    peak = f"matmul peak: {args.peak_tflops:.3g} TFLOP/s ({args.precision} {size}x{size} @ {size}x{size}, best of 10)"
    if args.device == "cpu":
        peak += f", {args.peak_cpu_tflops:.3g} TFLOP/s by CPU time"
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    if not args.flops_only:
        print(f"{peak} on {args.device}{threads}", flush=True)
    rows: list[dict] = []
    memory = PeakMemory(args.device, sample_rss=not args.interleave)  # RSS means nothing when all are built
    for preset in args.presets:
        rows += measure(preset, args, memory)
    memory.close()
    add_ratios(rows)
    write_csv(rows, args.out)
    if not args.flops_only:
        how = "interleaved" if args.interleave else "one variant after the other"
        print(f"\n{peak}{threads}; step = forward + backward + clip + AdamW + EMA; batch {args.batch}, "
              f"median of {args.steps} steps ({how})")  # fmt: skip
    print(markdown_table(rows))
    print(f"\nwrote {Path(args.out)}")
    if args.profile:
        print(f"\nprofile: {args.presets[0]} {args.profile} ({'compiled' if args.compile else 'eager'})")
        print(profile(args.presets[0], args.profile, args))


if __name__ == "__main__":
    main()
