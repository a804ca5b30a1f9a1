"""Hugging Face model folders, offline: find the folder (local path or local hub cache), read `config.json` and the
weights file (`model.safetensors`, `pytorch_model.bin` or an old transformers Flax msgpack) into Flax `params`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from flax import serialization, traverse_util

from vqlc_jax.convert.torch_layout import map_state_dict

CONFIG_NAME = "config.json"
# Searched in this order; the first present is loaded.
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id's snapshot in the local Hugging Face cache (never downloads)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_hub_id), local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError) as err:
        raise FileNotFoundError(
            f"{str(path_or_hub_id)!r} is neither a local folder nor a hub id in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); download it where there is internet (`hf download {path_or_hub_id}`) "
            f"and copy the folder or the cache here"
        ) from err


def read_config(folder: Path, model_types: Sequence[str]) -> dict:
    """`folder/config.json` as a dict; FileNotFoundError without it, ValueError unless its `model_type` is one of
    `model_types`."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}")
    config = json.loads(file.read_text())
    if config.get("model_type") not in model_types:
        raise ValueError(f"{file}: model_type {config.get('model_type')!r} is not one of {tuple(model_types)}")
    return config


def read_state(file: Path) -> dict[str, np.ndarray]:
    """Flat {dotted name: array} of a `model.safetensors`, `pytorch_model.bin` or (old transformers) Flax msgpack.

    The msgpack holds a Flax params tree (`vision_model/encoder/layers/0/self_attn/q_proj/kernel`, Flax layouts);
    its names are dotted, so `default_path` turns `layers.0` into `layers_0` like a torch key.
    """
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(file)
    if file.suffix == ".msgpack":
        tree = serialization.msgpack_restore(file.read_bytes())
        return {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}
    from vqlc_jax.convert.torch_file import load_torch_file, state_dict_from_checkpoint

    return state_dict_from_checkpoint(load_torch_file(file))


def load_params(folder: Path, template: Mapping, key_to_path: Callable[[str], tuple[str, ...] | None]) -> dict:
    """The `params` read from the first of WEIGHT_NAMES in `folder`, mapped by `key_to_path` and checked against
    `template` (CheckpointMismatchError naming the file and every unknown, missing and mis-shaped key)."""
    file = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{folder} has none of the weight files {', '.join(WEIGHT_NAMES)}")
    return map_state_dict(read_state(file), template, key_to_path=key_to_path, source=str(file))["params"]
