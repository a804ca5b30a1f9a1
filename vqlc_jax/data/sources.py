"""What every data source provides: random access by index to records, in a fixed order."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class Record(NamedTuple):
    """One example: `image` is uint8 [H, W, C] RGB(A)/gray or encoded bytes (decoded by the pipeline's workers),
    `label` an int class id (0 for unlabeled data), `key` a stable name (file path, crop id)."""

    image: np.ndarray | bytes
    label: int
    key: str


class Source(Protocol):
    """Random-access, deterministic-order data source. `__getitem__` may raise for an unreadable example; the
    pipeline skips it."""

    num_classes: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


class Subset:
    """The first `n` records of a source (evaluation on part of a split)."""

    def __init__(self, source: Source, n: int):
        if n < 1:
            raise ValueError(f"Subset: n must be positive, got {n}")
        self.source, self.n, self.num_classes = source, min(n, len(source)), source.num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < self.n:
            raise IndexError(f"Subset: index {index} outside [0, {self.n})")
        return self.source[index]
