"""Store converted Flax variable trees as one flat `.npz` and read them back checked against a template.

Keys are the '/'-joined Flax paths, collection first (`params/net/slice1_0/kernel`, `batch_stats/.../mean`), so a
file is readable with plain numpy and needs no pickle.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from flax import traverse_util

from vqlc_jax.convert.torch_layout import map_state_dict


def save_variables(variables: Mapping, path: str | os.PathLike) -> None:
    """Writes `variables` to `path` (exactly that name) as an uncompressed `.npz` with '/'-joined keys."""
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    with open(path, "wb") as f:  # a file object keeps np.savez from appending `.npz`
        np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


def load_variables(path: str | os.PathLike, template: Mapping) -> dict:
    """Reads `save_variables` output, checked against `template` (e.g. a `jax.eval_shape` of the module's init).

    Raises CheckpointMismatchError naming the file and every unknown, missing and mis-shaped key.
    """
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return map_state_dict(arrays, template, key_to_path=lambda k: tuple(k.split("/")), source=str(path))
