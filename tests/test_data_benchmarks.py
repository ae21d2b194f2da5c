"""benchmarks/decode.py and io_latency.py run; decode.py's fidelity measure reads what it should."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from decode import fidelity  # noqa: E402


def test_fidelity_is_zero_for_the_same_image_and_falls_with_blur():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 400, 300), dtype=torch.uint8, generator=g)
    assert fidelity(image, image, 64, (0.67, 1.0), (0.75, 4 / 3), 3, 0) == (0.0, math.inf)
    half = torch.nn.functional.avg_pool2d(image[None].float(), 2)[0].round().to(torch.uint8)
    mad, psnr = fidelity(image, half, 64, (0.67, 1.0), (0.75, 4 / 3), 3, 0)
    assert 0 < mad < 40 and 10 < psnr < 60


@pytest.mark.slow
def test_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "decode.csv"
    cmd = [sys.executable, str(BENCH / "decode.py"), "--sizes", "800x700", "--images", "1", "--repeat", "1",
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = csv.DictReader(out.open())
    assert row["decoded"] == "400x350" and row["min_side"] == "316"  # 1/2 keeps both sides >= 316
    assert float(row["psnr_db"]) > 20 and "| 800x700 | 400x350 |" in done.stdout


@pytest.mark.slow
def test_io_latency_benchmark_shows_overlapped_reads(tmp_path):
    out = tmp_path / "io.csv"
    cmd = [sys.executable, str(BENCH / "io_latency.py"), "--latency-ms", "50", "--io-threads", "0", "8", "--batch", "8",
           "--batches", "2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rates = {int(r["io_threads"]): float(r["img_per_s"]) for r in csv.DictReader(out.open())}
    assert rates[0] < 20 and rates[8] > rates[0]  # 50 ms a file caps one file at a time at 20 img/s
