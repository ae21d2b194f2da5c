"""The known-tag counts of the whole global batch, handed to every micro-batch of a step.

On partly tagged data (``data.untagged=unknown``, Open Images' ``data.unannotated=unknown``) a
batch carries ``known`` (bool ``B x 1`` or ``B x C``), and MLC's mean reductions divide by the
number of known elements (or images). Each process's micro-batch is one shard of the global
batch, and the engine averages mean losses over shards (DDP's gradient average over processes,
``1 / accum_steps`` over micro-batches); for that average to be the mean over the global batch's
known elements, every shard divides its known-element sum by ``global count / shards``. So the
feed below takes a step's micro-batches all at once, sums their counts over processes (one
all-reduce of two numbers per step) and puts ``known_counts`` into each.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hvpmtl.engine.distributed import DistEnv, all_reduce_sum
from hvpmtl.objectives.mlc import known_counts


class KnownCountFeed:
    """Wraps the loop's feed (``next``/``prefetch``). Batches without ``known`` pass through one
    at a time as before; with it (and more than one shard) the first call of a step reads all
    ``accum_steps`` micro-batches, so they sit on the device together."""

    def __init__(self, feed: Any, accum_steps: int, env: DistEnv):
        self.feed, self.accum_steps, self.env = feed, accum_steps, env
        self.shards = accum_steps * env.world_size
        self._rest: list[dict] = []
        self._of: tuple[Iterator, int] | None = None  # (iterator, step) the held micro-batches belong to

    def next(self, batches: Iterator, step: int) -> dict:
        if self._rest and self._of is not None and self._of[0] is batches and self._of[1] == step:
            return self._rest.pop(0)
        self._rest, self._of = [], None
        first = self.feed.next(batches, step)
        if not isinstance(first, dict) or "known" not in first or self.shards == 1:
            return first  # one shard: MLC counts its own batch
        micro = [first] + [self.feed.next(batches, step) for _ in range(self.accum_steps - 1)]
        num_classes = first["labels"].shape[1]
        total = sum(known_counts(b["known"], num_classes) for b in micro)
        per_shard = all_reduce_sum(total, self.env) / self.shards
        for b in micro:
            b["known_counts"] = per_shard
        self._rest, self._of = micro[1:], (batches, step)
        return first

    def prefetch(self, batches: Iterator, step: int, total_steps: int, steps_per_epoch: int) -> None:
        self.feed.prefetch(batches, step, total_steps, steps_per_epoch)
