"""Map PyTorch state dicts onto Flax variable trees.

PyTorch layouts: conv weight OIHW, linear weight [out, in], norm weight = scale. Flax layouts: conv kernel HWIO,
dense kernel [in, out], norm `scale`. A torch key becomes a Flax path by `default_path`: numeric segments join the
segment before them (`down.0.block.1.conv1.weight` -> `down_0/block_1/conv1/kernel`), so Flax modules are named
after the torch ones and the mapping needs no table. Every conversion checks the result against a template (the
`jax.eval_shape` of the module's init) and reports all unknown, missing and mis-shaped keys at once.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

Path = tuple[str, ...]

# BatchNorm buffers live in the `batch_stats` collection; `num_batches_tracked` has no Flax counterpart.
_BATCH_STATS = {"running_mean": "mean", "running_var": "var"}
IGNORED_LEAVES = ("num_batches_tracked",)


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: lists every unknown, missing and mis-shaped key."""


def default_path(key: str) -> Path | None:
    """`a.0.b.weight` -> ('params', 'a_0', 'b', 'weight'); None for keys with no Flax counterpart."""
    parts = key.split(".")
    if parts[-1] in IGNORED_LEAVES:
        return None
    names: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and names:
            names[-1] = f"{names[-1]}_{part}"
        else:
            names.append(part)
    leaf = parts[-1]
    if leaf in _BATCH_STATS:
        return ("batch_stats", *names, _BATCH_STATS[leaf])
    return ("params", *names, leaf)


def to_flax_array(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Converts one torch tensor to (flax leaf name, array) given its torch leaf name."""
    value = np.asarray(value)
    if leaf == "weight":
        if value.ndim == 4:  # conv OIHW -> HWIO
            return "kernel", np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:  # linear [out, in] -> [in, out]
            return "kernel", value.T
        if value.ndim == 1:  # GroupNorm / BatchNorm / LayerNorm weight
            return "scale", value
    return leaf, value


def map_state_dict(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping,
    *,
    key_to_path: Callable[[str], Path | None] = default_path,
    source: str = "state dict",
) -> dict:
    """Builds a Flax variable tree shaped like `template` from a torch `state_dict`.

    `key_to_path(key)` gives the Flax path (collection first, torch leaf name last) or None to skip the key.
    Raises CheckpointMismatchError listing unknown keys, template leaves left unfilled and shape mismatches.
    """
    expected = traverse_util.flatten_dict(dict(template))
    filled: dict[Path, np.ndarray] = {}
    unknown, misshaped = [], []
    for key, value in state_dict.items():
        path = key_to_path(key)
        if path is None:
            continue
        leaf, array = to_flax_array(path[-1], value)
        path = (*path[:-1], leaf)
        if path not in expected:
            unknown.append(f"{key} -> {'/'.join(path)}")
            continue
        want = tuple(expected[path].shape)
        if array.shape != want:
            misshaped.append(f"{key}: {tuple(np.shape(value))} -> {array.shape}, model expects {want}")
            continue
        filled[path] = array.astype(expected[path].dtype)
    missing = ["/".join(p) for p in expected if p not in filled]
    if unknown or missing or misshaped:
        lines = [f"{source} does not match the model:"]
        for title, items in (("unknown keys", unknown), ("missing", missing), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(sorted(items)))
        raise CheckpointMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(filled)


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries of `state_dict` under `prefix.` with the prefix removed."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
