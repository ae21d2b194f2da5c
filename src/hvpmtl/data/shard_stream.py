"""Pre-training from shards, streamed with the WebDataset library, with the global batches of one process.

How an epoch is read; all of it is a function of ``(train.seed, epoch)`` and the shard index,
never of the number of processes ``N`` or of loader workers ``M``:

1. The shards are put in a seeded random order; their samples, in that order, are the epoch's
   sequence of ``n`` samples.
2. The sequence is cut into ``K = data.shard_streams`` contiguous streams of ``P = n // K`` samples.
3. A stream is read front to back and shuffled within consecutive windows of ``W =
   data.shard_shuffle`` samples (a seeded permutation per epoch, stream and window).
4. Optimiser step ``s`` takes the next ``B / K`` samples of every stream (``B = data.batch_size``):
   the global batch is stream 0's share, then stream 1's, and so on; micro-batch ``a`` of
   ``A = train.accum_steps`` takes part ``a`` of every share (``B / (K A)`` samples each).
5. Process ``r`` reads streams ``[rK/N, (r+1)K/N)``; its loader worker ``w`` a contiguous part of
   those. A worker yields its streams' part of every micro-batch and the loader joins the ``M``
   parts in worker order, so process ``r``'s micro-batch is slice ``r`` of one process's
   micro-batch, the same split as :class:`~hvpmtl.engine.sampler.GlobalBatchSampler`'s.
6. A sample's views and mask are drawn from ``(train.seed, epoch, index)`` as in
   :class:`~hvpmtl.data.views.PretrainViews`, ``index`` being its source index (the ``index`` of
   its JSON; else its position in the shard index), so a sample gets the views it would get
   from the map-style reader of its source.

Hence ``N`` processes x ``M`` workers give one process's batches exactly (``K`` must be a multiple
of ``N``, ``M <= K / N``, and ``B`` a multiple of ``K A``). Each shard is read by one worker
per epoch, except a shard two streams share: both read it, the later one reading (not decoding)
the earlier one's part. Per epoch ``floor(P / (B/K))`` steps, each sample at most once; dropped:
the ``n mod K`` samples after the last stream and ``P mod (B/K)`` samples of each stream's last
window (fewer than ``K + B`` in all; which ones changes with the epoch, as with a shuffled
``drop_last``). The batches are not those of the map-style path (windowed, not a full
permutation of the data set). A worker holds one window of encoded samples per stream it reads.

Resume at step ``s`` of an epoch: each stream opens the shard holding the start of the window
with its output ``s B / K``, reads (without decoding) the shard's samples before the window and
the window's samples, and decodes from its output ``s B / K`` on. Nothing is trained twice or
skipped: a resumed run equals an uninterrupted one. Loader workers are started anew each epoch
and on resume (the epoch and start step travel with the data set), so ``data.persistent_workers``
does not apply. A shard whose sample count differs from its index is reported when a stream
reads it to its end.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from hvpmtl.data.decode import BadImageError, read_image
from hvpmtl.data.loading import DEFAULT_LOADING, BadImages, ImageLoading, LoadingSettings
from hvpmtl.data.shards import ShardError, ShardIndex, image_member, load_shard_index, parse_labels
from hvpmtl.data.tags import TagPolicy, check_unannotated
from hvpmtl.data.views import TwoViewTransform, collate_pretrain, pretrain_loading, seeded_cpu_rng, view_seed

__all__ = ["ShardStream", "pretrain_stream"]

_EXTRA = "data.dataset=shards reads shards with the webdataset library: pip install 'hvpmtl[shards]'"
_ORDER, _WINDOW = 1, 2  # RNG stream tags: shard order, window permutations


def _tar_samples(paths: list[str]):
    """WebDataset's samples (``{"__key__", "__url__", ext: bytes}``) of local tars, in order; each
    file is closed when it is read or the consumer stops."""
    try:
        from webdataset.tariterators import group_by_keys, tar_file_expander
    except ImportError as err:
        raise ImportError(_EXTRA) from err

    def opened():
        for path in paths:
            with open(path, "rb") as f:
                yield {"url": path, "stream": f}

    return group_by_keys(tar_file_expander(opened()))


class ShardStream(LoadingSettings, IterableDataset):
    """This process's pre-training micro-batches from shards (plan in the module docstring).

    Yields :func:`collate_pretrain` batches (``transform=None``: lists of ``{"image", "labels",
    "index"}`` samples, plus ``negatives`` where the shards list them, for reading benchmarks).
    Like a batch sampler it has ``steps_per_epoch`` and ``set_epoch(epoch, start_step)``;
    :meth:`distribute` places it in a process group.
    Images load as ``loading`` says, with the ``on_bad_image`` policy of the map-style readers
    (:class:`~hvpmtl.data.loading.BadImages`).
    """

    def __init__(
        self,
        index: ShardIndex,
        transform: TwoViewTransform | None,
        seed: int = 0,
        global_batch: int = 64,
        streams: int = 8,
        shuffle_window: int = 1000,
        loading: ImageLoading = DEFAULT_LOADING,
    ):
        if streams < 1 or shuffle_window < 1:
            raise ValueError(f"data.shard_streams={streams} and data.shard_shuffle={shuffle_window} must be >= 1")
        self.index, self.transform, self.seed = index, transform, seed
        self.classes = list(index.classes)
        self.vocab = {name: k for k, name in enumerate(self.classes)}
        self.global_batch, self.streams, self.window = global_batch, streams, shuffle_window
        self.loading, self.bad_images = loading, BadImages(loading)
        self.per_stream = index.total // streams
        self.tags = TagPolicy()  # pretrain_stream: marks untagged samples under data.untagged=unknown
        self.epoch, self.start_step = 0, 0
        self.distribute(0, 1, 1)

    def distribute(self, rank: int, world_size: int, accum_steps: int = 1) -> None:
        """Read as process ``rank`` of ``world_size`` with ``accum_steps`` micro-batches per step."""
        K, B = self.streams, self.global_batch
        if K % world_size:
            raise ValueError(f"data.shard_streams={K} must be a multiple of the number of processes ({world_size})")
        if B % (K * accum_steps):
            raise ValueError(
                f"data.batch_size={B} must be a multiple of data.shard_streams x train.accum_steps = {K} x "
                f"{accum_steps} (every step takes batch_size / shard_streams samples of each stream)"
            )
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.share = B // K
        self.steps_per_epoch = self.per_stream // self.share
        if self.steps_per_epoch < 1:
            raise ValueError(f"data.batch_size={B} is larger than the {self.index.total} samples of "
                             f"{self.index.origin} (cut into {K} streams: data.shard_streams)")  # fmt: skip

    def check_workers(self, num_workers: int) -> None:
        """A loader worker reads whole streams: at most ``shard_streams / processes`` of them."""
        per_rank = self.streams // self.world_size
        if num_workers > per_rank:
            raise ValueError(
                f"data.num_workers={num_workers}: each of the {self.world_size} processes reads {per_rank} of the "
                f"data.shard_streams={self.streams} streams, one worker at least one; lower data.num_workers "
                f"or raise data.shard_streams"
            )

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its optimiser step ``start_step`` (0-based) on."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = epoch, start_step

    # -- the plan ------------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _ORDER]).permutation(len(self.index.paths))

    def stream_positions(self, epoch: int, k: int) -> np.ndarray:
        """Positions in the epoch's sequence that stream ``k`` yields, in order (``steps * B/K``)."""
        P, W = self.per_stream, self.window
        n = self.steps_per_epoch * self.share
        out = np.empty(n, dtype=np.int64)
        for lo in range(0, n, W):
            size = min(W, P - lo)
            perm = np.random.default_rng([self.seed, epoch, _WINDOW, k, lo // W]).permutation(size) if W > 1 else [0]
            hi = min(lo + W, n)
            out[lo:hi] = k * P + lo + np.asarray(perm)[: hi - lo]
        return out

    def index_positions(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Epoch-sequence positions -> positions in the shard index's order."""
        order = self.shard_order(epoch)
        starts = np.concatenate([[0], np.cumsum(np.asarray(self.index.counts)[order])])
        slot = np.searchsorted(starts, positions, side="right") - 1
        return self.index.offsets[order[slot]] + (positions - starts[slot])

    def global_batch_positions(self, epoch: int, step: int) -> np.ndarray:
        """Index-order positions of the samples of optimiser step ``step`` over all processes, in order."""
        s = slice(step * self.share, (step + 1) * self.share)
        return np.concatenate([self.index_positions(epoch, self.stream_positions(epoch, k)[s])
                               for k in range(self.streams)])  # fmt: skip

    # -- reading -------------------------------------------------------------------------------
    def _read(self, epoch: int, first: int, end: int):
        """The raw samples (WebDataset dicts) at epoch positions ``[first, end)``, in order."""
        order = self.shard_order(epoch)
        starts = np.concatenate([[0], np.cumsum(np.asarray(self.index.counts)[order])])
        slot = int(np.searchsorted(starts, first, side="right")) - 1
        last = int(np.searchsorted(starts, end - 1, side="right")) - 1
        urls = [str(self.index.paths[order[s]]) for s in range(slot, last + 1)]
        skip, s, seen = first - int(starts[slot]), slot - 1, 0
        offsets = self.index.offsets
        for raw in _tar_samples(urls):
            if seen == 0 or raw["__url__"] != urls[s - slot]:
                if seen:
                    self._check_count(order[s], seen)
                s, seen = s + 1, 0
            seen += 1
            if skip:
                skip -= 1
                continue
            raw["__position__"] = int(offsets[order[s]]) + seen - 1
            yield raw
        if seen:
            self._check_count(order[s], seen)

    def _check_count(self, shard: int, seen: int) -> None:
        if seen != self.index.counts[shard]:
            path = self.index.paths[shard]
            raise ShardError(f"{path}: {seen} samples, {self.index.origin} lists {self.index.counts[shard]} "
                             "(re-write the shards, or their index)")  # fmt: skip

    def _stream(self, epoch: int, k: int, first_output: int):
        """Stream ``k``'s samples from its output ``first_output`` on, decoded."""
        order = self.stream_positions(epoch, k)
        n, W, P = len(order), self.window, self.per_stream
        if first_output >= n:
            return
        w0 = first_output // W
        raw = self._read(epoch, k * P + w0 * W, k * P + min(((n - 1) // W + 1) * W, P))
        for w in range(w0, (n - 1) // W + 1):
            lo = k * P + w * W
            window = list(islice(raw, min(W, P - w * W)))
            if len(window) < min(W, P - w * W):
                raise ShardError(f"{self.index.origin}: the shards end early (fewer samples than listed)")
            for t in range(max(first_output, w * W), min((w + 1) * W, n)):
                yield self._sample(window, int(order[t]) - lo, epoch)

    def _multi_hot(self, tags: list[str], where: str) -> torch.Tensor:
        out = torch.zeros(len(self.classes))
        for t in tags:
            if t not in self.vocab:
                raise ShardError(f"{where}: unknown label '{t}' (not in the {len(self.vocab)} classes)")
            out[self.vocab[t]] = 1.0
        return out

    def _decode(self, raw: dict) -> tuple[bytes, dict, int, str]:
        """``(image bytes, {"labels"[, "negatives"]}, source index, where)`` of a raw sample."""
        url, key = raw["__url__"], raw["__key__"]
        ext = image_member(url, key, raw)
        if "json" not in raw:  # this and every error below: one line, even from a loader worker (ShardError)
            raise ShardError(f"{url}: sample '{key}' has no .json member (its labels)")
        tags, absent, index = parse_labels(raw["json"], f"{url}:{key}.json")
        tagging = {"labels": self._multi_hot(tags, f"{url}:{key}.json")}
        if self.index.has_negatives:
            tagging["negatives"] = self._multi_hot(absent or [], f"{url}:{key}.json")
        where = f"{url}:{key}.{ext}"
        return raw[ext], tagging, raw["__position__"] if index is None else index, where

    @property
    def num_skipped(self) -> int:
        """Bad images replaced in this process (``on_bad_image=skip``)."""
        return self.bad_images.num_skipped

    def _sample(self, window: list[dict], j: int, epoch: int) -> dict:
        """Sample ``j`` of a window; under ``on_bad_image=skip`` an unreadable image is replaced by
        the next readable one of the window, cyclically (views still drawn from the asked sample's
        index); a window of one sample (``data.shard_shuffle=1``) has no stand-in."""
        decoded: dict[int, tuple[bytes, dict, int, str]] = {}

        def name(step: int) -> tuple[str, str]:  # a malformed sample (ShardError) stops under either policy
            decoded[step] = self._decode(window[(j + step) % len(window)])
            return "", decoded[step][3]

        def load(step: int) -> torch.Tensor:
            data, _, _, where = decoded[step]
            return read_image(where, self.loading.max_pixels, data=data, min_side=self.loading.decode_min_side)

        def exhausted(step: int, err: BadImageError) -> BadImageError:
            return BadImageError(f"{self.index.origin}: no image of a shuffle window of {len(window)} can be read, "
                                 f"e.g. {decoded[step][3]}: {err.reason}", err.reason)  # fmt: skip

        step, image = self.bad_images.first_readable(range(len(window)), name, load, exhausted)
        tagging, index = decoded[step][1], decoded[0][2]  # the stand-in's tags, the asked sample's index
        if self.transform is None:
            return {"image": image, **tagging, "index": index}
        with seeded_cpu_rng(view_seed(self.seed, epoch, index)):
            v0, v1, mask = self.transform(image)
        labels, known = self.tags.apply(tagging, index)  # data.untagged, data.unannotated
        out = {"views": (v0, v1), "mask": mask, "labels": labels, "index": index}
        return out if known is None else {**out, "known": known}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_rank = self.streams // self.world_size
        mine = np.array_split(np.arange(self.rank * per_rank, (self.rank + 1) * per_rank), workers)[worker]
        if len(mine) == 0:
            raise ValueError(f"loader worker {worker} has no stream to read ({per_rank} streams, {workers} workers)")
        epoch, part = self.epoch, self.share // self.accum_steps
        streams = [self._stream(epoch, int(k), self.start_step * self.share) for k in mine]
        for _ in range((self.steps_per_epoch - self.start_step) * self.accum_steps):
            samples = [s for g in streams for s in islice(g, part)]
            yield collate_pretrain(samples) if self.transform is not None else samples


def pretrain_stream(cfg: Any, classes: list[str] | None, transform: TwoViewTransform) -> ShardStream:
    """The :class:`ShardStream` of ``data.shards`` for a root ``Config``: loading as
    :func:`~hvpmtl.data.views.pretrain_loading` says (skips listed in the run folder), and a check that
    the tasks reading tags (``cfg.tasks.label_readers()``) have some."""
    d = cfg.data
    try:
        _tar_samples([])
    except ImportError as err:
        raise ValueError(str(err)) from None
    index = load_shard_index(d.shards, "data.shards", classes)
    readers = cfg.tasks.label_readers()
    if index.num_tagged == 0 and readers:
        raise ValueError(f"{index.origin}: no sample has a label, and {' and '.join(readers)} need labels (or set "
                         f"{' '.join(r + '.weight=0' for r in readers)})")  # fmt: skip
    stream = ShardStream(index, transform, cfg.train.seed, d.batch_size, d.shard_streams, d.shard_shuffle,
                         pretrain_loading(cfg))  # fmt: skip
    check_unannotated(d, index.has_negatives, index.origin)
    stream.tags = TagPolicy(mark_untagged=d.untagged == "unknown" and index.may_be_untagged,
                            per_class=d.unannotated == "unknown" and index.has_negatives,
                            untagged_negative=d.untagged == "negative")  # fmt: skip
    return stream
