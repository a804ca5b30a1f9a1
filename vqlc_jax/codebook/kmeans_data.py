"""Feature sources for k-means: arrays in memory, memory-mapped .npy files, or shards larger than memory.

A source is anything with `num_rows`, `dim` and `read(indices) -> [len(indices), dim]` (`FeatureSource`). k-means
reads random rows of it per block of steps, so features never have to fit in memory.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import numpy as np


@runtime_checkable
class FeatureSource(Protocol):
    """Rows of a [num_rows, dim] feature matrix, read by index."""

    @property
    def num_rows(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` (int, any order, repeats allowed) -> [len(indices), dim], a floating dtype."""
        ...


class ArraySource:
    """A FeatureSource over an array-like [n, D] (np.ndarray, np.memmap, h5py dataset, ...)."""

    def __init__(self, array: np.ndarray) -> None:
        if len(array.shape) != 2:
            raise ValueError(f"features must be 2-D [n, D], got shape {array.shape}")
        self.array = array

    @property
    def num_rows(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def read(self, indices: np.ndarray) -> np.ndarray:
        # Sorted unique reads: sequential access on memory-mapped files.
        unique, inverse = np.unique(np.asarray(indices), return_inverse=True)
        return np.asarray(self.array[unique])[inverse]


class NpyShards:
    """A FeatureSource over .npy shards [n_i, D] stacked in the given order, memory-mapped."""

    def __init__(self, paths: Sequence[str | pathlib.Path]) -> None:
        if not paths:
            raise ValueError("NpyShards: no shard paths given")
        self.shards = [np.load(path, mmap_mode="r") for path in paths]
        dims = {shard.shape[1:] for shard in self.shards}
        if any(shard.ndim != 2 for shard in self.shards) or len(dims) != 1:
            shapes = {str(path): shard.shape for path, shard in zip(paths, self.shards)}
            raise ValueError(f"NpyShards: shards must be 2-D with one feature dim, got shapes {shapes}")
        self.offsets = np.cumsum([0] + [shard.shape[0] for shard in self.shards])

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.shards[0].shape[1])

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"NpyShards: row indices must lie in [0, {self.num_rows})")
        unique, inverse = np.unique(indices, return_inverse=True)
        shard_of = np.searchsorted(self.offsets, unique, side="right") - 1
        out = np.empty((unique.size, self.dim), self.shards[0].dtype)
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self.shards[s][unique[mask] - self.offsets[s]]
        return out[inverse]


def is_resident(data: object) -> bool:
    """Whether `data` is an in-memory array (copied to the devices) rather than a source read per block."""
    return isinstance(data, jax.Array) or (isinstance(data, np.ndarray) and not isinstance(data, np.memmap))


def as_source(data: object) -> FeatureSource:
    """`data` as a FeatureSource: sources pass through, arrays (memory-mapped or not) are wrapped."""
    if isinstance(data, FeatureSource):
        return data
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        return ArraySource(data)
    raise TypeError(f"features must be an array [n, D] or a FeatureSource (num_rows, dim, read), got "
                    f"{type(data).__name__}")
