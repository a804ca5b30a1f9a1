"""Exported models on disk: a JSON description beside an orbax tree of arrays (`Tokenizer.save`,
`Generator.save`), written once and never overwritten, read back onto this process's first device."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def save(directory: str | pathlib.Path, tree: Any, *, arrays_dir: str, meta_file: str, meta: dict) -> pathlib.Path:
    """Writes `meta` as `directory/meta_file` and `tree` under `directory/arrays_dir`; refuses to overwrite.

    In a multi-process job every process calls it (orbax writes each array once); the directory must be shared."""
    directory = pathlib.Path(directory).absolute()
    target = directory / arrays_dir
    exists = target.exists()
    if jax.process_count() > 1:  # every process has looked before any writes
        multihost_utils.sync_global_devices(f"save {directory}")
    if exists:
        raise FileExistsError(f"{target} already exists; choose an empty directory (nothing was overwritten)")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, tree)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / meta_file).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return directory


def read_meta(directory: str | pathlib.Path, meta_file: str, writer: str) -> dict:
    """The JSON description; FileNotFoundError naming the file (and what writes it) when absent."""
    path = pathlib.Path(directory).absolute() / meta_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a directory written by {writer}")
    return json.loads(path.read_text())


def restore(directory: str | pathlib.Path, arrays_dir: str, abstract: Any) -> Any:
    """The tree saved under `directory/arrays_dir`, shaped like `abstract`, on this process's first device (the
    saved shardings name the devices of the process that wrote it)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
    return ocp.StandardCheckpointer().restore(pathlib.Path(directory).absolute() / arrays_dir, abstract)
