"""The taming-transformers VQGAN encoder and decoder used by VQGAN-LC, as Flax linen modules (NHWC).

Submodules carry the names of the PyTorch ones (`down_0/block_1/conv1`, `mid/attn_1/q`, ...) so official state dicts
map onto them mechanically (see `vqlc_jax.convert.torch_layout`). Attention placement follows the configured
`resolution`, as in taming: level i runs at resolution / 2**i whatever the actual input size.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def Normalize(name: str | None = None) -> nn.GroupNorm:
    """GroupNorm(32, eps=1e-6) with the two-pass variance of torch (no E[x^2] - E[x]^2 shortcut)."""
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


def conv3x3(features: int, name: str, strides: int = 1, padding=((1, 1), (1, 1))) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding=padding, name=name)


def conv1x1(features: int, name: str) -> nn.Conv:
    return nn.Conv(features, (1, 1), name=name)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice with dropout before the second conv; 1x1 `nin_shortcut` when widths differ."""

    out_channels: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = conv3x3(self.out_channels, "conv1")(nn.swish(Normalize("norm1")(x)))
        h = nn.swish(Normalize("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = Normalize("norm")(x)
        q, k, v = (conv1x1(c, n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5), axis=-1)
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hgt, wid, c)
        return x + conv1x1(c, "proj_out")(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (taming's asymmetric padding)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv3x3(x.shape[-1], "conv", strides=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(x.shape[-1], "conv")(x)


class Level(nn.Module):
    """One resolution level: `num_blocks` ResnetBlocks, each followed by attention when `attn` is set."""

    out_channels: int
    num_blocks: int
    attn: bool
    dropout: float = 0.0
    resample: str | None = None  # "down", "up" or None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.dropout, name=f"block_{j}")(x, train)
            if self.attn:
                x = AttnBlock(name=f"attn_{j}")(x)
        if self.resample == "down":
            x = Downsample(name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(name="upsample")(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution."""

    channels: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = ResnetBlock(self.channels, self.dropout, name="block_1")(x, train)
        x = AttnBlock(name="attn_1")(x)
        return ResnetBlock(self.channels, self.dropout, name="block_2")(x, train)


class _Architecture(nn.Module):
    """The taming `ddconfig` fields that encoder and decoder share (defaults: the f16 VQGAN)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    resolution: int = 256
    dropout: float = 0.0


class Encoder(_Architecture):
    """Images [B, H, W, in_channels] -> latents [B, H/f, W/f, z_channels (x2 if double_z)], f = 2**(len(ch_mult)-1)."""

    in_channels: int = 3
    double_z: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = conv3x3(self.ch, "conv_in")(x)
        res = self.resolution
        last = len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            h = Level(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions, self.dropout,
                      resample="down" if i != last else None, name=f"down_{i}")(h, train)
            res = res // 2 if i != last else res
        h = MidBlock(h.shape[-1], self.dropout, name="mid")(h, train)
        h = nn.swish(Normalize("norm_out")(h))
        return conv3x3(2 * self.z_channels if self.double_z else self.z_channels, "conv_out")(h)


class Decoder(_Architecture):
    """Latents [B, h, w, z_channels] -> images [B, h*f, w*f, out_ch].

    `features` stops before the last conv (`conv_out`) and `head` applies it: the trainer needs both halves to take
    the adaptive GAN weight's gradients at the last layer without a second backward pass.
    """

    out_ch: int = 3

    def setup(self):
        self.conv_in = conv3x3(self.ch * self.ch_mult[-1], "conv_in")
        self.mid = MidBlock(self.ch * self.ch_mult[-1], self.dropout)
        self.up = [
            Level(self.ch * mult, self.num_res_blocks + 1, (self.resolution >> i) in self.attn_resolutions,
                  self.dropout, resample="up" if i != 0 else None)
            for i, mult in enumerate(self.ch_mult)
        ]
        self.norm_out = Normalize()
        self.conv_out = conv3x3(self.out_ch, "conv_out")

    def features(self, z: jax.Array, train: bool = False) -> jax.Array:
        """Everything but the last conv: [B, H, W, ch * ch_mult[0]] after the final norm and swish."""
        h = self.mid(self.conv_in(z), train)
        for level in reversed(self.up):
            h = level(h, train)
        return nn.swish(self.norm_out(h))

    def head(self, h: jax.Array) -> jax.Array:
        """The last conv, `conv_out`."""
        return self.conv_out(h)

    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        return self.head(self.features(z, train))
