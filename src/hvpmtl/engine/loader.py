"""The pre-training loader of one process: its micro-batches, and the object that places an epoch.

Map-style data sets (every reader but shards) go through :class:`GlobalBatchSampler` and a
``DataLoader``; a :class:`~hvpmtl.data.shard_stream.ShardStream` is read by ``M`` loader workers
whose parts of each micro-batch :class:`ShardLoader` joins. Either way the loop calls
``sampler.set_epoch(epoch, step)`` and then iterates the loader for the rest of that epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from hvpmtl.data.shard_stream import ShardStream
from hvpmtl.data.views import collate_pretrain
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.sampler import GlobalBatchSampler


def join_batches(parts: list) -> Any:
    """Concatenate the loader workers' parts of one micro-batch, in worker order (tensors along
    the batch, dicts and the two views entry by entry; decode-only sample lists end to end)."""
    if isinstance(parts[0], list):  # decode-only samples (ShardStream without a transform)
        return [s for p in parts for s in p]
    return _join(parts)


def _join(parts: list) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_join([p[i] for p in parts]) for i in range(len(first))]
    raise TypeError(f"cannot join batch parts of type {type(first).__name__}")


class ShardLoader:
    """Iterates a :class:`ShardStream` with ``num_workers`` workers, one micro-batch per item.

    A ``DataLoader`` over an iterable data set takes item ``i`` from worker ``i mod M``; worker
    ``w`` yields its streams' part of every micro-batch, so ``M`` consecutive items are the
    parts of one micro-batch. Workers start anew each epoch (they copy the epoch to read).
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False, seed: int = 0):
        self.stream, self.workers = stream, num_workers
        self.pin = pin_memory
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory and num_workers <= 1,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG out of it
        )

    def __iter__(self):
        items = iter(self.loader)
        if self.workers <= 1:
            yield from items
            return
        while True:
            parts = list(_take(items, self.workers))
            if not parts:
                return
            if len(parts) < self.workers:
                raise RuntimeError(f"shard loader: {len(parts)} of {self.workers} parts of a micro-batch")
            batch = join_batches(parts)
            yield _pinned(batch) if self.pin else batch


def _take(items, n: int):
    for _ in range(n):
        try:
            yield next(items)
        except StopIteration:
            return


def _pinned(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_pinned(v) for v in batch]
    return batch.pin_memory() if isinstance(batch, torch.Tensor) else batch


def build_pretrain_loader(dataset, cfg: Any, env: DistEnv) -> tuple[Any, Any]:
    """``(loader, sampler)`` of this process for ``dataset`` (``build_pretrain_dataset``'s)."""
    d, t = cfg.data, cfg.train
    pin = d.pin_memory and env.device.type == "cuda"
    if isinstance(dataset, ShardStream):
        dataset.distribute(env.rank, env.world_size, t.accum_steps)
        dataset.check_workers(d.num_workers)
        return ShardLoader(dataset, d.num_workers, pin, t.seed), dataset
    sampler = GlobalBatchSampler(len(dataset), d.batch_size, env.rank, env.world_size, t.accum_steps, t.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=d.num_workers,
        collate_fn=collate_pretrain,
        pin_memory=pin,
        persistent_workers=d.persistent_workers and d.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG out of it
    )
    return loader, sampler
