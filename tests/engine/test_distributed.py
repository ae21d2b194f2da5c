"""Data parallelism (engine/distributed.py): N processes x B/N reproduce 1 process x B.

The torchrun runs use gloo on CPU. Stochastic layers (the MLC decoder's dropout) draw per-process
randomness, so they are switched off here; everything else (views, masks, Sinkhorn over the
global batch, BatchNorm over the global batch, MLC's loss summed over the global batch, the
option whose rescaling is the engine's job) must agree.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from hvpmtl.engine.distributed import GlobalBatchNorm, convert_global_batchnorm, ddp_has_forward_sync_buffers
from hvpmtl.engine.faults import inject
from hvpmtl.engine.metrics import read_metrics

from .conftest import TINY, free_port, torchrun

LOSSES = ("loss", "loss_mlc", "loss_swav", "loss_mim", "loss_distill", "grad_norm")
# gradient shares measured every 2 steps: their extra backward passes must not change training
# SwAV's queue (16 images, one global batch) fills at step 1 and joins the Sinkhorn from step 2
COMMON = [*TINY, "tasks.mlc.dropout=0", "tasks.mlc.reduction=global_sum",
          "train.log_every=1", "data.num_workers=0", "train.grad_share_every=2", "tasks.swav.queue_length=16"]
SHARES = [f"grad_share_{t}" for t in ("mlc", "swav", "mim", "distill")]


def _bn_worker(rank: int, port: int, x: torch.Tensor, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = GlobalBatchNorm(5)
    bn.weight.data.uniform_()
    xr = x[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
    y = bn(xr)
    (y * torch.arange(5.0)).pow(2).sum().backward()
    result[rank] = (y.detach(), xr.grad, bn.running_mean, bn.running_var, bn.weight.grad)
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_matches_batchnorm_on_union():
    torch.manual_seed(1)
    x = torch.randn(6, 5) * 3 + 1
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_bn_worker, args=(free_port(), x, result), nprocs=2, join=True)
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    bn.weight.data.uniform_()
    xs = x.clone().requires_grad_(True)
    y = bn(xs)
    (y * torch.arange(5.0)).pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([result[0][0], result[1][0]]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([result[0][1], result[1][1]]), xs.grad, atol=1e-5, rtol=1e-5)
    for r in (0, 1):
        torch.testing.assert_close(result[r][2], bn.running_mean)
        torch.testing.assert_close(result[r][3], bn.running_var)
    # each rank holds the gradient of its own half; DDP sums (then averages) them
    torch.testing.assert_close(result[0][4] + result[1][4], bn.weight.grad, atol=1e-4, rtol=1e-5)


class _WithBuffer(nn.Module):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("queue", torch.full((4,), float(rank + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.queue[:2]


def _ddp_buffer_worker(rank: int, port: int, legacy: bool, result: dict) -> None:
    from hvpmtl.engine import distributed as engine_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if legacy:  # a torch without DDP's forward_sync_buffers keyword (< 2.13)
        engine_dist.ddp_has_forward_sync_buffers = lambda: False
    torch.manual_seed(rank)  # other weights and buffers on each rank before wrapping
    env = engine_dist.DistEnv(rank=rank, world_size=2)
    model = engine_dist.wrap_model(_WithBuffer(rank), env, sync_bn=False)
    at_wrap = model.module.queue.clone()
    model.module.queue.fill_(10.0 * (rank + 1))  # a forward must not broadcast it again
    model(torch.ones(1, 3)).sum().backward()
    result[rank] = (at_wrap, model.module.queue.clone(), model.module.lin.weight.detach().clone())
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["forward_sync_buffers", "broadcast_buffers"])
def test_ddp_syncs_buffers_at_wrap_only(legacy):
    """Buffers come from rank 0 when DDP wraps the model and are never broadcast in forward, with
    or without the keyword torch 2.13 added."""
    if not legacy and not ddp_has_forward_sync_buffers():
        pytest.skip("this torch has no forward_sync_buffers")
    result = mp.Manager().dict()
    mp.spawn(_ddp_buffer_worker, args=(free_port(), legacy, result), nprocs=2, join=True)
    for rank in (0, 1):
        at_wrap, after_forward, weight = result[rank]
        torch.testing.assert_close(at_wrap, torch.full((4,), 1.0))  # rank 0's buffer everywhere
        torch.testing.assert_close(after_forward, torch.full((4,), 10.0 * (rank + 1)))  # kept local
        torch.testing.assert_close(weight, result[0][2])  # parameters synced as always


def test_convert_keeps_state_and_single_process_falls_back():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    model[1].running_mean.fill_(0.5)
    converted = convert_global_batchnorm(model)
    assert isinstance(converted[1], GlobalBatchNorm)
    assert converted[1].running_mean.eq(0.5).all()
    x = torch.randn(5, 4)
    ref = nn.BatchNorm1d(8)
    ref.load_state_dict(converted[1].state_dict())
    torch.testing.assert_close(converted(x), ref(model[0](x)))


_SINGLE: dict = {}


def _single(tmp_path_factory, accum: int = 1, reduction: str = "global_sum"):
    """The 1-process reference run (cached per accumulation setting and MLC reduction)."""
    from hvpmtl.cli import main

    if (accum, reduction) not in _SINGLE:
        out = tmp_path_factory.mktemp(f"single{accum}{reduction}") / "run"
        args = [*COMMON, "train.max_steps=4", f"train.accum_steps={accum}", f"train.output_dir={out}",
                f"tasks.mlc.reduction={reduction}"]  # fmt: skip
        assert main(["pretrain", *args]) == 0
        _SINGLE[accum, reduction] = out
    return _SINGLE[accum, reduction]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    return _single(tmp_path_factory)


def _compare(single, multi) -> None:
    a, b = read_metrics(single / "metrics.csv"), read_metrics(multi / "metrics.csv")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for k in LOSSES:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
    for rows in (a, b):  # DDP: each process's share on its half batch, averaged; FSDP: not measured
        measured = [r for r in rows if r.get(SHARES[0], math.nan) == r.get(SHARES[0], math.nan)]
        assert all(r["step"] % 2 == 0 and sum(r[k] for k in SHARES) == pytest.approx(1.0, abs=1e-5) for r in measured)
    wa, wb = load_file(single / "model.safetensors"), load_file(multi / "model.safetensors")
    assert wa.keys() == wb.keys()
    diffs = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    # Adam turns rounding noise in near-zero gradients (key biases, biases before BatchNorm,
    # the prototypes' first step) into steps of up to ~lr = 1e-3; a real mismatch moves everything
    assert diffs.max() < 2e-3 and diffs.median() < 1e-6, (diffs.max(), diffs.median())


@pytest.mark.slow
@pytest.mark.parametrize("strategy, accum, reduction", [
    ("ddp", 1, "global_sum"), ("fsdp", 1, "global_sum"), ("ddp", 2, "global_sum"), ("fsdp", 2, "global_sum"),
    ("ddp", 2, "query2label"),  # a per-process mean (the default): DDP's average alone makes it global
])  # fmt: skip
def test_two_processes_match_one(strategy, accum, reduction, tmp_path_factory, tmp_path):
    # with accum_steps=2 the non-final micro-batch runs without gradient sync (no_sync /
    # set_requires_gradient_sync); one process with the same accumulation is the reference
    out = tmp_path / strategy
    args = [*COMMON, "train.max_steps=4", f"train.accum_steps={accum}", f"train.output_dir={out}",
            f"tasks.mlc.reduction={reduction}"]  # fmt: skip
    r = torchrun(2, ["pretrain", *args, f"dist.strategy={strategy}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (SHARES[0] in read_metrics(out / "metrics.csv")[0]) == (strategy == "ddp")
    assert r.stdout.count("throughput") == 1  # rank 0 prints the summary, once
    _compare(_single(tmp_path_factory, accum, reduction), out)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(single_run, tmp_path):
    from hvpmtl.cli import main

    out = tmp_path / "fsdp"
    with inject(stop_after=2):  # the ranks inherit the environment
        r = torchrun(2, ["pretrain", *COMMON, "train.max_steps=4", "train.ckpt_every=2", f"train.output_dir={out}",
                         "dist.strategy=fsdp"])  # fmt: skip
    assert r.returncode != 0 and "simulated crash after step 2" in r.stderr
    assert main(["pretrain", *COMMON, "train.max_steps=4", f"train.output_dir={out}", "train.resume=auto"]) == 0
    _compare(single_run, out)
