"""``train.compile=model``: the whole forward compiled, specialised on the objectives' phases only.

Dynamo's ``eager`` and ``aot_eager`` backends capture the graphs inductor would be given (guards,
recompiles, graph breaks, AOT's backward) without generating code, so these tests run in seconds.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import hvpmtl
from conftest import make_batch, tiny_config

# SwAV's prototypes unfreeze after step 2; its queue (12 rows, 4 images a step) is full after
# step 3 and joins the Sinkhorn from then on: two phase changes in 6 steps.
PHASES = ["tasks.swav.freeze_prototypes_iters=2", "tasks.swav.queue_length=12"]


def _steps(model: hvpmtl.HVPMTL, cfg: hvpmtl.Config, n: int) -> list[dict[str, float]]:
    """``n`` training steps (forward, backward, AdamW, ``after_step``) on fixed batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)  # dropout's draws
    logged = []
    for i in range(n):
        out = model(make_batch(cfg, batch_size=4, seed=i))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step()
        logged.append({k: float(v.detach()) for k, v in out.items() if k.startswith("loss") or k == "swav_collapse"})
    return logged


@pytest.mark.slow
def test_compiled_forward_recompiles_only_when_a_phase_changes():
    cfg = tiny_config(*PHASES)
    torch.manual_seed(0)
    eager = hvpmtl.build(cfg)
    torch.manual_seed(0)
    compiled = hvpmtl.build(cfg)
    compiled.compile_forward(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    expected, got = _steps(eager, cfg, 6), _steps(compiled, cfg, 6)
    # one graph per phase: frozen without queue, unfrozen without queue, unfrozen with queue (the
    # step counter and the queue's fill level would otherwise recompile it at every step)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for e, g in zip(expected, got, strict=True):
        assert e.keys() == g.keys()
        for key in e:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), key
    assert compiled.swav.queue_filled == eager.swav.queue_filled == 12
    torch.testing.assert_close(compiled.swav.queue, eager.swav.queue)
    assert int(compiled.swav.queue_rows) == 12


def _ddp_worker(rank: int, init_file: str, out_dir: str, backend: str) -> None:
    """4 DDP steps on 2 processes (gloo), this rank's 4 images a step; rank 0 writes the losses."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = tiny_config("tasks.swav.freeze_prototypes_iters=1", "tasks.swav.queue_length=16")
        torch.manual_seed(0)
        model = hvpmtl.build(cfg)
        if backend:
            model.compile_forward(backend=backend)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1 + rank)
        losses = []
        for i in range(4):
            out = ddp(make_batch(cfg, batch_size=4, seed=10 * i + rank))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.after_step()
            losses.append({k: float(v.detach()) for k, v in out.items() if k.startswith("loss")})
        if rank == 0:
            stats = {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}
            with open(os.path.join(out_dir, f"{backend or 'eager'}.json"), "w") as f:
                json.dump({"losses": losses, **stats}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_forward_under_ddp_traces_the_collectives_and_matches_eager(tmp_path):
    """SwAV's all-gather (queue) and Sinkhorn's all-reduces inside the compiled forward, 2 processes."""
    sys.path.insert(0, os.path.dirname(__file__))  # spawned children import this module
    for backend in ("", "aot_eager"):
        mp.spawn(_ddp_worker, args=(str(tmp_path / f"init{backend}"), str(tmp_path), backend), nprocs=2, join=True)
    eager, compiled = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "aot_eager"))
    # frozen; unfrozen before the queue is full (16 rows, 8 images a step); with the queue
    assert compiled["graphs"] == 3 and compiled["breaks"] == 0
    for e, c in zip(eager["losses"], compiled["losses"], strict=True):
        assert c == pytest.approx(e, rel=1e-5, abs=1e-7)


def test_eval_forward_neither_pushes_nor_counts():
    model = hvpmtl.build(tiny_config(*PHASES)).eval()
    model(make_batch(tiny_config(*PHASES), batch_size=4))
    assert model.swav.queue_filled == 0 and not model.swav.queue.any()
    model.train()(make_batch(tiny_config(*PHASES), batch_size=4))
    assert model.swav.queue_filled == 4 and model.swav.queue[:, :4].any() and not model.swav.queue[:, 4:].any()


def test_compile_key_is_checked():
    with pytest.raises(ValueError, match="train.compile"):
        tiny_config("train.compile=everything")
    assert tiny_config("train.compile=model").train.compile == "model"
    assert tiny_config("train.compile=true").train.compile is True
