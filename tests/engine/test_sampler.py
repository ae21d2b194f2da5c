"""The (index, epoch) batch sampler (engine/sampler.py): splits, epochs, mid-epoch resume."""

from __future__ import annotations

import pytest

from hvpmtl.engine.sampler import GlobalBatchSampler


def test_ranks_split_each_global_batch_exactly():
    one = GlobalBatchSampler(50, 12, accum_steps=2, seed=3)
    one.set_epoch(1)
    ref = list(one)  # micro-batches of 6
    assert len(ref) == 4 * 2 and all(len(b) == 6 for b in ref)
    per_rank = []
    for r in range(3):
        s = GlobalBatchSampler(50, 12, rank=r, world_size=3, accum_steps=2, seed=3)
        s.set_epoch(1)
        per_rank.append(list(s))
    for m, micro in enumerate(ref):
        union = [k for r in range(3) for k in per_rank[r][m]]
        assert union == micro  # contiguous slices, in rank order
    assert all(e == 1 for micro in ref for _, e in micro)


def test_epochs_are_distinct_permutations_and_drop_the_tail():
    s = GlobalBatchSampler(10, 4, seed=0)
    assert s.steps_per_epoch == 2 and len(s) == 2
    s.set_epoch(0)
    e0 = [i for b in s for i, _ in b]
    s.set_epoch(1)
    e1 = [i for b in s for i, _ in b]
    assert len(set(e0)) == 8 and e0 != e1
    s2 = GlobalBatchSampler(10, 4, seed=0)
    s2.set_epoch(0)
    assert [i for b in s2 for i, _ in b] == e0  # deterministic


def test_mid_epoch_start_skips_consumed_batches():
    s = GlobalBatchSampler(40, 8, world_size=2, rank=1, accum_steps=2, seed=5)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[3 * 2 :] and len(s) == 2 * 2
    one = GlobalBatchSampler(40, 8, seed=5)
    assert s.global_batch_indices(2, 3).tolist() == one.global_batch_indices(2, 3).tolist()


def test_bad_sizes_fail_with_the_key_name():
    with pytest.raises(ValueError, match="data.batch_size=10 must be divisible"):
        GlobalBatchSampler(100, 10, world_size=4)
    with pytest.raises(ValueError, match="larger than the data set"):
        GlobalBatchSampler(8, 16)
