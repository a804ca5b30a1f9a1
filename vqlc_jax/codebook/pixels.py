"""A weight-free feature extractor: raw pixel patches, pooled like the CLIP features (for runs without weights).

An image [H, W, C] is cut into non-overlapping `patch_size` x `patch_size` patches on the row-major grid; each
patch is one vector of its pixels in (row, column, channel) order (p * p * C values: 48 for p = 4, RGB), divided by
sqrt(p * p * C) (`rms_scale`, the default), so that a vector's L2 norm is its patch's RMS value (at most 1 for the
pipeline's [-1, 1] pixels).
The patch grid is then `pool` x `pool` average-pooled exactly as `CLIPFeatureExtractor`'s (`clip.pool_patches`),
so a codebook built from it has the shape and row layout of a CLIP one.

Why the scale: the release's linear projector starts as N(0, D'^-1/2), which maps a codebook row of norm r to a
D'-vector of expected norm r. Unscaled [-1, 1] patches (norm up to 6.9 at 48 values) started the projected codebook
several times wider than the encoder's latents: 300-step lc runs on the bundled photos used 22% of 1,024 codes,
against 91% with the scale (README, "The paper's claim at small scale").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.codebook.clip import pool_patches


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]: patches row-major, each flattened in (row, column, channel) order."""
    batch, height, width, channels = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the {height}x{width} image")
    rows, cols = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, rows, patch_size, cols, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


class PixelPatchExtractor:
    """`extractor(pixel_values NHWC)` -> dict of `patch_features` [B, P, p*p*C] and `pooled_features`
    [B, P / pool^2, p*p*C], like `CLIPFeatureExtractor` (which also returns `last_hidden_state`). It has no weights:
    `params` is empty and `features(params, pixel_values)` is the pure function to put in a caller's jit."""

    def __init__(self, patch_size: int = 4, pool: int = 4, *, rms_scale: bool = True, num_channels: int = 3,
                 dtype: Any = jnp.float32):
        for name, value in (("patch_size", patch_size), ("pool", pool), ("num_channels", num_channels)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"PixelPatchExtractor: {name} must be a positive int, got {value!r}")
        self.patch_size, self.pool, self.num_channels, self.dtype = int(patch_size), int(pool), num_channels, dtype
        self.scale = self.dim ** -0.5 if rms_scale else 1.0
        self.params: dict = {}
        self._forward = jax.jit(self.features)

    @property
    def dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    def features(self, params: Mapping, pixel_values: jax.Array) -> dict[str, jax.Array]:
        del params  # weight-free; the argument keeps the CLIP extractor's calling convention
        patches = patchify(pixel_values.astype(self.dtype), self.patch_size) * self.scale
        return {"patch_features": patches, "pooled_features": pool_patches(patches, self.pool)}

    def __call__(self, pixel_values: np.ndarray | jax.Array) -> dict[str, jax.Array]:
        shape = np.shape(pixel_values)
        if len(shape) != 4 or shape[-1] != self.num_channels:
            raise ValueError(f"expected NHWC pixel values with {self.num_channels} channels, got {shape}")
        return self._forward(self.params, jnp.asarray(pixel_values))
