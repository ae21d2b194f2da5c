"""Resumable, process-splitting batch sampler over ``(index, epoch)`` keys.

Each epoch is one seeded permutation of the data set cut into global batches of
``data.batch_size`` (the last incomplete batch is dropped). A global batch is cut into
``accum_steps`` micro-batches and each micro-batch into ``world_size`` contiguous slices, one per
rank, so the union over ranks of micro-batch ``a`` is exactly what one process would see. The
sampler yields ``(index, epoch)`` keys: ``PretrainViews`` draws the views of a sample from
``(seed, epoch, index)``, which makes batches identical across resumes and process counts.
Resuming mid-epoch starts the permutation at a given step without reading skipped samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's micro-batches: lists of ``(index, epoch)``.

    Args:
        dataset_size: number of samples.
        global_batch: samples per optimiser step over all ranks and micro-batches.
        rank, world_size: this process and the number of processes.
        accum_steps: micro-batches per optimiser step.
        seed: permutation seed (epoch ``e`` uses ``default_rng([seed, e])``).
        shuffle: permute each epoch (else the natural order).
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        shards = world_size * accum_steps
        if global_batch % shards:
            raise ValueError(
                f"data.batch_size={global_batch} must be divisible by processes x train.accum_steps "
                f"= {world_size} x {accum_steps}"
            )
        if dataset_size < global_batch:
            raise ValueError(f"data.batch_size={global_batch} is larger than the data set ({dataset_size} images)")
        self.dataset_size, self.global_batch = dataset_size, global_batch
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.seed, self.shuffle = seed, shuffle
        self.micro_batch = global_batch // accum_steps
        self.local_batch = self.micro_batch // world_size
        self.steps_per_epoch = dataset_size // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its optimiser step ``start_step`` (0-based) on."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def global_batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """The indices of optimiser step ``step`` of ``epoch`` over all ranks (for tests)."""
        return self.permutation(epoch)[step * self.global_batch : (step + 1) * self.global_batch]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, e = self.permutation(self.epoch), self.epoch
        lo = self.rank * self.local_batch
        for step in range(self.start_step, self.steps_per_epoch):
            batch = perm[step * self.global_batch : (step + 1) * self.global_batch]
            for a in range(self.accum_steps):
                micro = batch[a * self.micro_batch : (a + 1) * self.micro_batch]
                yield [(int(i), e) for i in micro[lo : lo + self.local_batch]]
