"""Deterministic, resumable, process-sharded batches, decoded and transformed in background threads.

Global step s of a pipeline with E = steps_per_epoch reads, in epoch e = s // E, positions
[(s % E) * G, (s % E + 1) * G) of the epoch's order (a permutation seeded by (seed, e) for training, the split's
own order for evaluation); process p of P takes the p-th of P equal slices. A batch is therefore a pure function
of (source, seed, step, process), so a pipeline started at `start_step` yields exactly what an uninterrupted one
yields from there, and the P processes together read the one-process global batch. Training crops are random
with a generator seeded by (seed, epoch, source index): independent of process count and worker timing.

Without `drop_remainder` the last batch of an epoch is padded (positions past the end wrap to the start) and
`mask` is False there, so evaluation metrics are exact. An unreadable image (error reading or decoding it) is
replaced by the next readable index, logged once, counted in `Pipeline.skipped`, and masked out. The order and
batch-index rules live in `BatchOrder`, which the encoded-dataset reader (`vqlc_jax.data.encoded`) shares.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from vqlc_jax.data.sources import Source
from vqlc_jax.data.transforms import decode_image, resize_crop, to_float

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_UNREADABLE = 64


class SkippedImages:
    """Thread-safe record of the unreadable source indices (each logged once): `count`, `errors` {index: why}."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.errors: dict[int, str] = {}

    def add(self, index: int, error: Exception) -> None:
        with self._lock:
            if index not in self.errors:
                self.errors[index] = f"{type(error).__name__}: {error}"
                log.warning("skipping unreadable image at index %d (%s)", index, self.errors[index])

    def __contains__(self, index: int) -> bool:
        return index in self.errors

    @property
    def count(self) -> int:
        return len(self.errors)


@dataclasses.dataclass(frozen=True)
class Batch:
    """This process's share of global batch `step`: `image` float32 [B, R, R, 3] in [-1, 1], `label` int32 [B],
    `index` int64 [B] (position in the source), `mask` bool [B] (False on padding and on stand-ins for unreadable
    images), `keys` the records' names; `end_of_epoch` marks the last batch of `epoch`."""

    step: int
    epoch: int
    end_of_epoch: bool
    image: np.ndarray
    label: np.ndarray
    index: np.ndarray
    mask: np.ndarray
    keys: tuple[str, ...]

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-example arrays, to put on devices."""
        return {"image": self.image, "label": self.label, "index": self.index, "mask": self.mask}


@dataclasses.dataclass(frozen=True)
class BatchOrder:
    """Which examples global batch `step` holds and which of them this process reads (the module docstring's rules),
    for any dataset of `num_examples` examples: the image pipeline and the encoded-dataset reader share it."""

    num_examples: int
    global_batch_size: int
    seed: int
    shuffle: bool
    process_index: int = 0
    process_count: int = 1
    drop_remainder: bool = False

    @classmethod
    def for_split(cls, num_examples: int, *, global_batch_size: int, seed: int, train: bool, process_index: int,
                  process_count: int, drop_remainder: bool | None) -> "BatchOrder":
        """Training (shuffled, remainder dropped unless `drop_remainder` says otherwise) or evaluation (in order,
        last batch padded) batches."""
        return cls(num_examples, global_batch_size, seed, shuffle=train, process_index=process_index,
                   process_count=process_count, drop_remainder=train if drop_remainder is None else drop_remainder)

    def __post_init__(self) -> None:
        g, p = self.global_batch_size, self.process_count
        if g <= 0 or p <= 0 or g % p:
            raise ValueError(f"global_batch_size={g} must be a positive multiple of process_count={p}")
        if not 0 <= self.process_index < p:
            raise ValueError(f"process_index={self.process_index} not in [0, process_count={p})")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.steps_per_epoch == 0:
            raise ValueError(f"global_batch_size={g} exceeds the {self.num_examples} examples of the source "
                             f"with drop_remainder={self.drop_remainder}: no full batch")

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        n, g = self.num_examples, self.global_batch_size
        return n // g if self.drop_remainder else math.ceil(n / g)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def end_of_epoch(self, step: int) -> bool:
        return (step + 1) % self.steps_per_epoch == 0

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of `epoch` in reading order."""
        n = self.num_examples
        return np.random.default_rng((self.seed, 0, epoch)).permutation(n) if self.shuffle else np.arange(n)

    def batch_indices(self, step: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(example indices int64 [B], not-padding bool [B]) of this process's share of global batch `step`;
        `order` may pass in `self.order(epoch)` already computed."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch) if order is None else order
        start = within * self.global_batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size)
        return order[positions % len(order)].astype(np.int64), positions < len(order)

    def indexed_steps(self, start_step: int, num_epochs: int | None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(step, example indices, not-padding) of this process's batches from `start_step` to the end of epoch
        `num_epochs` (forever when None)."""
        end = None if num_epochs is None else num_epochs * self.steps_per_epoch
        steps = itertools.count(start_step) if end is None else range(start_step, end)
        orders: dict[int, np.ndarray] = {}
        for step in steps:
            epoch = self.epoch(step)
            if epoch not in orders:
                orders = {epoch: self.order(epoch)}  # steps only go forward: keep one epoch's order
            yield (step, *self.batch_indices(step, orders[epoch]))


@dataclasses.dataclass
class Pipeline:
    """Iterable of `Batch`es from `start_step` to the end of epoch `num_epochs` (forever when None). Build with
    `make_pipeline`."""

    source: Source
    resolution: int
    batches: BatchOrder
    train: bool
    start_step: int
    num_epochs: int | None
    num_workers: int | None
    prefetch: int
    skipped: SkippedImages = dataclasses.field(default_factory=SkippedImages)

    def __iter__(self) -> Iterator[Batch]:
        pending: collections.deque[tuple[int, np.ndarray, np.ndarray, np.ndarray, list[Future]]] = collections.deque()
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="vqlc-data") as pool:
            try:
                for step, indices, mask in self.batches.indexed_steps(self.start_step, self.num_epochs):
                    epoch = self.batches.epoch(step)
                    images = np.empty((len(indices), self.resolution, self.resolution, 3), np.float32)
                    futures = [pool.submit(self._load, epoch, int(i), images, j) for j, i in enumerate(indices)]
                    pending.append((step, indices, mask, images, futures))
                    if len(pending) > self.prefetch:
                        yield self._collect(*pending.popleft())
                while pending:
                    yield self._collect(*pending.popleft())
            finally:
                for *_, futures in pending:
                    for future in futures:
                        future.cancel()

    def _collect(self, step: int, indices: np.ndarray, mask: np.ndarray, images: np.ndarray,
                 futures: list[Future]) -> Batch:
        labels, keys, replaced = zip(*(future.result() for future in futures))
        return Batch(step=step, epoch=self.batches.epoch(step), end_of_epoch=self.batches.end_of_epoch(step),
                     image=images, label=np.asarray(labels, np.int32), index=indices,
                     mask=mask & ~np.asarray(replaced), keys=keys)

    def _load(self, epoch: int, index: int, out: np.ndarray, slot: int) -> tuple[int, str, bool]:
        """Writes example `index` (or its stand-in) transformed into out[slot]; returns (label, key, replaced)."""
        n = len(self.source)
        for offset in range(min(MAX_CONSECUTIVE_UNREADABLE, n)):
            candidate = (index + offset) % n
            if candidate in self.skipped:
                continue
            try:
                record = self.source[candidate]
                image = decode_image(record.image)
            except Exception as error:  # one bad file must not end the run
                self.skipped.add(candidate, error)
                continue
            rng = np.random.default_rng((self.batches.seed, 1, epoch, index)) if self.train else None
            out[slot] = to_float(resize_crop(image, self.resolution, rng))
            return record.label, record.key, offset > 0
        raise RuntimeError(f"no readable image among source indices {index}..{index + offset} (mod {n}); at "
                           f"{index}: {self.skipped.errors.get(index)}")


def make_pipeline(source: Source, *, resolution: int, global_batch_size: int, seed: int, train: bool,
                  process_index: int = 0, process_count: int = 1, start_step: int = 0,
                  num_epochs: int | None = None, drop_remainder: bool | None = None,
                  num_workers: int | None = None, prefetch: int = 2) -> Pipeline:
    """Batches of `source` at `resolution` for this process (see the module docstring).

    train=True: reshuffled every epoch, random crops, forever unless `num_epochs`, remainder dropped by default.
    train=False: source order, centre crops, one pass unless `num_epochs`, last batch padded and masked by default.
    `num_workers` threads decode (ThreadPoolExecutor's default when None); `prefetch` batches are read ahead.
    """
    if start_step < 0 or prefetch < 0 or resolution <= 0:
        raise ValueError(f"start_step={start_step}, prefetch={prefetch} must be >= 0 and resolution={resolution} > 0")
    batches = BatchOrder.for_split(len(source), global_batch_size=global_batch_size, seed=seed, train=train,
                                   process_index=process_index, process_count=process_count,
                                   drop_remainder=drop_remainder)
    return Pipeline(source=source, resolution=resolution, batches=batches, train=train, start_step=start_step,
                    num_epochs=1 if num_epochs is None and not train else num_epochs, num_workers=num_workers,
                    prefetch=prefetch)
