"""Build `models.lpips.LPIPS` variables from PyTorch weights, and store them as one flat `.npz`.

Sources: (a) an official VQGAN-LC checkpoint (keys under `perceptual_loss.`, trunk under `net.slice*`), or (b) the
torchvision VGG16 file (`vgg16-397923af.pth`, keys `features.{i}.weight/bias`) plus the lpips v0.1 heads file
(`vgg.pth`, keys `lin{k}.model.1.weight`). Converters take dicts of numpy arrays; the `*_file(s)` wrappers read
`.pth` files with `convert.torch_file.load_torch_file`.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.convert.npz_variables import load_variables, save_variables
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, map_state_dict, strip_prefix
from vqlc_jax.models.lpips import LPIPS, SCALE, SHIFT, VGG16_SLICES

VQGAN_LC_PREFIX = "perceptual_loss"
_SCALING_LAYER = {"scaling_layer.shift": SHIFT, "scaling_layer.scale": SCALE}
# torchvision `features` index -> lpips slice number.
_FEATURE_SLICE = {i: n for n, (_, indices) in enumerate(VGG16_SLICES, start=1) for i in indices}

StateDict = Mapping[str, np.ndarray]


def lpips_template() -> dict:
    """Shapes and dtypes of the LPIPS variables (no computation)."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)


def _drop_scaling_layer(state_dict: StateDict, source: str) -> dict[str, np.ndarray]:
    """`state_dict` without the scaling-layer buffers, after checking they hold lpips' constants."""
    for key, want in _SCALING_LAYER.items():
        if key in state_dict and not np.allclose(np.ravel(state_dict[key]), want, rtol=1e-6, atol=0):
            raise CheckpointMismatchError(
                f"{source}: {VQGAN_LC_PREFIX}.{key} = {np.ravel(state_dict[key])}, LPIPS uses the constant {want}"
            )
    return {k: v for k, v in state_dict.items() if k not in _SCALING_LAYER}


def lpips_from_vqgan_lc(state_dict: StateDict, source: str = "VQGAN-LC state dict") -> dict:
    """LPIPS variables from an official VQGAN-LC model state dict (the `perceptual_loss.*` entries)."""
    sub = _drop_scaling_layer(strip_prefix(state_dict, VQGAN_LC_PREFIX), source)
    return map_state_dict(sub, lpips_template(), source=f"{source} [{VQGAN_LC_PREFIX}.*]")


def _vgg_trunk_key(key: str) -> str | None:
    """`features.{i}.{leaf}` -> `net.slice{n}.{i}.{leaf}`; None for the classifier; other keys unchanged."""
    parts = key.split(".")
    if parts[0] == "classifier":
        return None
    if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) in _FEATURE_SLICE:
        return f"net.slice{_FEATURE_SLICE[int(parts[1])]}.{parts[1]}.{parts[2]}"
    return key  # reported as unknown by map_state_dict


def lpips_from_torchvision(
    vgg_state_dict: StateDict, heads_state_dict: StateDict, source: str = "torchvision VGG16 + lpips heads"
) -> dict:
    """LPIPS variables from torchvision's VGG16 state dict and the lpips v0.1 `vgg.pth` heads."""
    trunk = {new: v for k, v in vgg_state_dict.items() if (new := _vgg_trunk_key(k)) is not None}
    overlap = sorted(trunk.keys() & heads_state_dict.keys())
    if overlap:
        raise CheckpointMismatchError(f"{source}: keys in both files: {'; '.join(overlap)}")
    return map_state_dict({**trunk, **heads_state_dict}, lpips_template(), source=source)


def _load_pth(path: str | os.PathLike) -> Mapping:
    from vqlc_jax.convert.torch_file import load_torch_file  # lazy: only the file readers need it

    return load_torch_file(path)


def lpips_from_vqgan_lc_file(path: str | os.PathLike) -> dict:
    """`lpips_from_vqgan_lc` on a VQGAN-LC `.pth` (`{'model': state_dict, ...}` or a bare state dict)."""
    obj = _load_pth(path)
    return lpips_from_vqgan_lc(obj.get("model", obj), source=str(path))


def lpips_from_torchvision_files(vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> dict:
    """`lpips_from_torchvision` on `vgg16-397923af.pth` and lpips' `weights/v0.1/vgg.pth`."""
    return lpips_from_torchvision(_load_pth(vgg_path), _load_pth(heads_path), source=f"{vgg_path} + {heads_path}")


def save_lpips_variables(variables: Mapping, path: str | os.PathLike) -> None:
    """Writes LPIPS variables to one `.npz` with flat '/'-joined keys (`params/net/slice1_0/kernel`, ...)."""
    save_variables(variables, path)


def load_lpips_variables(path: str | os.PathLike) -> dict:
    """Reads `save_lpips_variables` output, checked against the LPIPS template (errors name the file and keys)."""
    return load_variables(path, lpips_template())
