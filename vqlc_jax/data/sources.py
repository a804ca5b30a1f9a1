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
