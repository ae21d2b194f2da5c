"""The pre-training loader of one process: its micro-batches, and the object that places an epoch.

Map-style data sets (every reader but shards) go through :class:`GlobalBatchSampler` and a
``DataLoader``; a :class:`~hvpmtl.data.shard_stream.ShardStream` is read by ``M`` loader workers
whose parts of each micro-batch :class:`ShardLoader` joins. Either way the loop calls
``sampler.set_epoch(epoch, step)`` and then iterates the loader for the rest of that epoch.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch
from torch.utils.data import DataLoader

from hvpmtl.data import DeviceViews, build_view_transform
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
    With ``M > 1`` a thread joins the parts (and pins the batch) up to ``ahead`` micro-batches
    ahead, so that the training thread neither copies batches nor waits for the copies.
    """

    ahead = 2  # joined micro-batches the thread keeps ready

    def __init__(
        self, stream: ShardStream, num_workers: int, pin_memory: bool = False, seed: int = 0, prefetch_factor: int = 2
    ):
        self.stream, self.workers = stream, num_workers
        self.pin = pin_memory
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory and num_workers <= 1,
            persistent_workers=False,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG out of it
        )

    def __iter__(self):
        items = iter(self.loader)  # the workers start here, in the calling thread
        if self.workers <= 1:
            yield from items
            return
        ready: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        thread = threading.Thread(target=self._join_parts, args=(items, ready, stop), name="shard-join", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = ready.get()
                if kind == "batch":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:  # also when the loop stops early: the thread ends and drops the workers' iterator
            stop.set()
            thread.join()

    def _join_parts(self, items, ready: queue.Queue, stop: threading.Event) -> None:
        """The thread: ``("batch", joined micro-batch)`` per ``M`` parts, then ``("end", None)``;
        an error (a worker's included) goes to the training thread as ``("error", exception)``."""

        def put(item: tuple) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():
                parts = list(_take(items, self.workers))
                if not parts:
                    break
                if len(parts) < self.workers:
                    raise RuntimeError(f"shard loader: {len(parts)} of {self.workers} parts of a micro-batch")
                batch = join_batches(parts)
                if not put(("batch", _pinned(batch) if self.pin else batch)):
                    return
            put(("end", None))
        except BaseException as err:  # handed to the training thread, which raises it
            put(("error", err))


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
        return ShardLoader(dataset, d.num_workers, pin, t.seed, d.prefetch_factor), dataset
    sampler = GlobalBatchSampler(len(dataset), d.batch_size, env.rank, env.world_size, t.accum_steps, t.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=d.num_workers,
        collate_fn=collate_pretrain,
        pin_memory=pin,
        persistent_workers=d.persistent_workers and d.num_workers > 0,
        prefetch_factor=d.prefetch_factor if d.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG out of it
    )
    return loader, sampler


class DeviceFeed:
    """The loop's micro-batches, on the device. With ``data.augment_on=device`` the workers sent
    uint8 crops and per-sample parameters (pinned); flip, rotation, colour jitter, RandAugment
    and normalisation run here, batched on the device, and :meth:`prefetch` makes the next
    step's first micro-batch while the device still runs this step's backward, so the host's
    launches of the batched ops overlap the device's work."""

    def __init__(self, cfg: Any, device: torch.device):
        self.cfg, self.device = cfg, device
        self.on_device = cfg.data.augment_on == "device"
        self.views = None  # DeviceViews, built at first use
        self.ahead: tuple | None = None  # (iterator, step, batch) made by prefetch

    def next(self, batches, step: int) -> dict:
        """The next micro-batch of ``batches`` for optimiser step ``step``."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] is batches and ahead[1] == step:
            return ahead[2]
        batch = next(batches)
        if self.on_device:
            if self.views is None:
                self.views = DeviceViews(build_view_transform(self.cfg))
            batch = self.views(batch, self.device)
        return to_device(batch, self.device)

    def prefetch(self, batches, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """After step ``step``'s backward: make step ``step + 1``'s first micro-batch now (device
        augmentation only; not across an epoch's end, where the loop starts a new iterator)."""
        after = step + 1
        if self.on_device and after < total_steps and after % steps_per_epoch:
            self.ahead = (batches, after, self.next(batches, after))


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and lists of tensors) of a batch on ``device``, non-blocking on CUDA."""
    nb = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, (list, tuple)):
            out[k] = [x.to(device, non_blocking=nb) for x in v]
        else:
            out[k] = v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v
    return out
