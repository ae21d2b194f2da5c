"""Sinkhorn under data parallelism: 2 processes x batch B == 1 process x batch 2B, with and
without a queue; the queue's global batch is gathered in rank order."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hvpmtl.objectives.swav import all_gather_rows, sinkhorn

B, K, D, L = 16, 8, 12, 24


def _global_scores() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(2 * B, D, generator=g), dim=1)
    c = F.normalize(torch.randn(K, D, generator=g), dim=1)
    return z @ c.t() * 6.0  # large enough that truncation at T_max is active


def _queue_scores() -> torch.Tensor:
    return _global_scores().flip(0)[:L] * 0.5  # L rows, the same on every process


def _worker(rank: int, init_file: str, out_dir: str, stabilize: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        local = _global_scores()[rank * B : (rank + 1) * B]
        torch.save(sinkhorn(local, stabilize=stabilize), os.path.join(out_dir, f"q{rank}.pt"))
        queued = sinkhorn(local, stabilize=stabilize, queue_scores=_queue_scores())
        torch.save(queued, os.path.join(out_dir, f"queued{rank}.pt"))
        torch.save(all_gather_rows(local), os.path.join(out_dir, f"gathered{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stabilize", ["truncate", "max_shift"])
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, stabilize):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    sys.path.insert(0, os.path.dirname(__file__))  # spawned children import this module
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), stabilize), nprocs=2, join=True)
    q = torch.cat([torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in range(2)])
    expected = sinkhorn(_global_scores(), stabilize=stabilize)
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-6)
    # and a per-process Sinkhorn (no all-reduce) would differ
    alone = torch.cat([sinkhorn(s, stabilize=stabilize) for s in _global_scores().chunk(2)])
    assert not torch.allclose(alone, expected, atol=1e-4)
    # with a queue: the queued rows count once in the global sums, as on one process
    queued = torch.cat([torch.load(tmp_path / f"queued{r}.pt", weights_only=True) for r in range(2)])
    expected = sinkhorn(_global_scores(), stabilize=stabilize, queue_scores=_queue_scores())
    torch.testing.assert_close(queued, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(queued, q, atol=1e-4)  # the queue changes the codes
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"gathered{r}.pt", weights_only=True), _global_scores())
