"""LDM's class-conditional UNet (CompVis `openaimodel.UNetModel` with spatial transformers, as the VQGAN-LC release's
`ldm-lc` uses it), NHWC.

Timestep features `[cos, sin]` (DiT's `timestep_embedding`, width `model_channels`) through `time_embed`; the class
goes through `class_embedder` (the release's `ClassEmbedder`: a table of num_classes + 1 rows, the last the null
class of classifier-free guidance) to ONE context token that every spatial transformer cross-attends to. Input
blocks (ResBlocks, spatial transformers at the downsample factors in `attention_resolutions`, stride-2 conv
downsampling), a middle block (ResBlock, transformer, ResBlock) and output blocks fed with the input blocks' outputs
concatenated last-in first-out (nearest x2 upsampling + conv), then GroupNorm, SiLU, conv. The release's legacy
defaults throughout: no scale-shift norm, conv resampling, no ResBlock up/down, 1x1 conv `proj_in`/`proj_out`.

Submodules carry the release's names (`input_blocks_1_0/in_layers_0`, `middle_block_1/transformer_blocks_0/attn2/
to_v`, `out_2`, ...), so `vqlc_jax.convert.official_ldm` maps its state dicts without a table. A fresh model uses
PyTorch's default inits and LDM's zero-initialised output convs (ResBlock `out_layers_3`, transformer `proj_out`,
`out_2`): it predicts 0. Label dropout is the trainer's; the null class id is `num_classes`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.models.dit import timestep_embedding

Array = jax.Array

# The release's configs (`ldm-lc/configs/imagenet-f{16,8}-vqgan-lc-100K.yaml`): latents 16x16x8 and 32x32x4.
LDM_F16 = dict(in_channels=8, out_channels=8, model_channels=256, channel_mult=(1, 4), num_res_blocks=3,
               attention_resolutions=(4, 1), num_head_channels=32, transformer_depth=1, context_dim=512,
               num_classes=1000)
LDM_F8 = dict(in_channels=4, out_channels=4, model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
              attention_resolutions=(4, 2, 1), num_head_channels=32, transformer_depth=1, context_dim=512,
              num_classes=1000)

GROUPS = 32
_TORCH_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch's U(+-1/sqrt(fan_in))
_ZEROS = nn.initializers.zeros


def _conv(features: int, kernel: int, name: str, dtype: Any, *, strides: int = 1, zero: bool = False) -> nn.Conv:
    """A torch-style conv: 'same' padding (kernel // 2 on each side), optionally zero-initialised."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, kernel_init=_ZEROS if zero else _TORCH_INIT, name=name)


def _group_norm(eps: float, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm(32) computed in float32 with torch's two-pass variance."""
    return nn.GroupNorm(num_groups=GROUPS, epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class ResBlock(nn.Module):
    """`skip(x) + out_layers(in_layers(x) + emb_layers(emb))`: GroupNorm (eps 1e-5), SiLU, conv3x3; the timestep
    embedding added per channel; GroupNorm, SiLU, dropout, zero-init conv3x3; a 1x1 `skip_connection` when the width
    changes."""

    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, context: Array, train: bool = False) -> Array:
        del context
        h = _conv(self.out_channels, 3, "in_layers_2", self.dtype)(nn.silu(_group_norm(1e-5, "in_layers_0")(x)))
        emb = nn.Dense(self.out_channels, dtype=self.dtype, kernel_init=_TORCH_INIT, name="emb_layers_1")(nn.silu(emb))
        h = nn.silu(_group_norm(1e-5, "out_layers_0")(h + emb[:, None, None]))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, "out_layers_3", self.dtype, zero=True)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "skip_connection", self.dtype)(x)
        return x + h


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, T, D] to `context` [B, S, Dc] (x itself when None): bias-free `to_q/to_k/to_v`,
    softmax(q k^T / sqrt(d)) in float32, `to_out_0` with bias."""

    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        context = x if context is None else context
        inner = self.heads * self.dim_head

        def project(name, source):
            y = nn.Dense(inner, use_bias=False, dtype=self.dtype, kernel_init=_TORCH_INIT, name=name)(source)
            return y.reshape(*y.shape[:2], self.heads, self.dim_head)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        out = jax.nn.dot_product_attention(q, k, v).reshape(*x.shape[:2], inner)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_TORCH_INIT, name="to_out_0")(out)


class GEGLU(nn.Module):
    """`a * gelu(g)` (exact erf GELU) with `a, g` the two halves of `proj(x)`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        a, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, kernel_init=_TORCH_INIT, name="proj")(x), 2,
                            axis=-1)
        return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """`net_2(net_0(x))`: a GEGLU to 4 x dim, then a Linear back to dim."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        h = GEGLU(4 * dim, self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, kernel_init=_TORCH_INIT, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm (eps 1e-5) self-attention `attn1`, cross-attention `attn2` to the context, GEGLU feed-forward
    `ff` (inner width 4 x dim), each with a residual connection."""

    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        norm = lambda name: nn.LayerNorm(1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + CrossAttention(self.heads, self.dim_head, self.dtype, name="attn1")(norm("norm1")(x))
        x = x + CrossAttention(self.heads, self.dim_head, self.dtype, name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
    """`x + proj_out(blocks(proj_in(norm(x))))` over the positions as tokens (row-major): GroupNorm (eps 1e-6),
    1x1 convs in and out (`proj_out` zero-initialised), `depth` BasicTransformerBlocks."""

    heads: int
    dim_head: int
    depth: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, context: Array, train: bool = False) -> Array:
        del emb, train
        b, hgt, wid, ch = x.shape
        inner = self.heads * self.dim_head
        h = _conv(inner, 1, "proj_in", self.dtype)(_group_norm(1e-6, "norm")(x)).reshape(b, hgt * wid, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(self.heads, self.dim_head, self.dtype, name=f"transformer_blocks_{i}")(h, context)
        return x + _conv(ch, 1, "proj_out", self.dtype, zero=True)(h.reshape(b, hgt, wid, inner))


class Downsample(nn.Module):
    """Conv3x3 `op` with stride 2 and padding 1."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, context: Array, train: bool = False) -> Array:
        del emb, context, train
        return _conv(x.shape[-1], 3, "op", self.dtype, strides=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3 `conv`."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, context: Array, train: bool = False) -> Array:
        del emb, context, train
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class UNet(nn.Module):
    """Class-conditional LDM UNet: `apply(variables, x [B, H, W, in_channels], t [B], y [B] int) -> eps [B, H, W,
    out_channels]` (float32).

    `attention_resolutions` are downsample factors, as in the release's yaml (1: the input resolution). Heads: fixed
    width `num_head_channels` per head, or a fixed count `num_heads` when num_head_channels is None. Parameters stay
    float32; `dtype` is the compute dtype (norms and attention softmax in float32). `remat` checkpoints every
    ResBlock and transformer; `dropout` (ResBlocks only, as released) is active with `train=True` and an rng
    'dropout'. H and W must be divisible by 2 ** (len(channel_mult) - 1).
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    num_head_channels: int | None = 32
    num_heads: int | None = None
    transformer_depth: int = 1
    context_dim: int = 512
    num_classes: int = 1000
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        widths = [self.model_channels * m for m in self.channel_mult]
        if not self.channel_mult or self.channel_mult[0] != 1:
            raise ValueError(f"UNet channel_mult={self.channel_mult} must start with 1 (the output conv takes "
                             f"model_channels={self.model_channels} inputs)")
        if any(w % GROUPS for w in widths):
            raise ValueError(f"UNet widths {widths} (model_channels x channel_mult) must be multiples of {GROUPS} "
                             "(GroupNorm groups)")
        if self.num_res_blocks < 1 or self.transformer_depth < 1 or self.num_classes < 1:
            raise ValueError(f"UNet num_res_blocks={self.num_res_blocks}, transformer_depth={self.transformer_depth} "
                             f"and num_classes={self.num_classes} must be >= 1")
        if (self.num_head_channels is None) == (self.num_heads is None):
            raise ValueError(f"UNet: set exactly one of num_head_channels={self.num_head_channels} and "
                             f"num_heads={self.num_heads}")
        for w in {widths[-1], *(widths[i] for i in range(len(widths)) if 2 ** i in self.attention_resolutions)}:
            per_head = self.num_head_channels or self.num_heads
            if w % per_head:
                raise ValueError(f"UNet: attention width {w} is not divisible by "
                                 f"{'num_head_channels' if self.num_head_channels else 'num_heads'}={per_head}")
        super().__post_init__()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def heads(self, width: int) -> tuple[int, int]:
        """(heads, channels per head) of a spatial transformer at `width` channels."""
        heads = width // self.num_head_channels if self.num_head_channels else self.num_heads
        return heads, width // heads

    def setup(self):
        mc, dt = self.model_channels, self.dtype
        self.time_embed_0 = nn.Dense(4 * mc, dtype=dt, kernel_init=_TORCH_INIT)
        self.time_embed_2 = nn.Dense(4 * mc, dtype=dt, kernel_init=_TORCH_INIT)
        self.class_embedder = nn.Embed(self.num_classes + 1, self.context_dim, dtype=dt,
                                       embedding_init=nn.initializers.normal(1.0))
        res = nn.remat(ResBlock, static_argnums=(4,)) if self.remat else ResBlock
        attn = nn.remat(SpatialTransformer, static_argnums=(4,)) if self.remat else SpatialTransformer
        levels = range(len(self.channel_mult))

        def level_block(level):  # a ResBlock to the level's width, then a transformer where the level attends
            width = mc * self.channel_mult[level]
            layers = [res(width, self.dropout, dt)]
            if 2 ** level in self.attention_resolutions:
                layers.append(attn(*self.heads(width), self.transformer_depth, dt))
            return layers

        input_blocks = [[nn.Conv(mc, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, kernel_init=_TORCH_INIT)]]
        for level in levels:
            input_blocks += [level_block(level) for _ in range(self.num_res_blocks)]
            if level != levels[-1]:
                input_blocks.append([Downsample(dt)])
        self.input_blocks = input_blocks
        width = mc * self.channel_mult[-1]
        self.middle_block = [res(width, self.dropout, dt), attn(*self.heads(width), self.transformer_depth, dt),
                             res(width, self.dropout, dt)]
        output_blocks = []
        for level in reversed(levels):
            for i in range(self.num_res_blocks + 1):
                upsample = [Upsample(dt)] if level and i == self.num_res_blocks else []
                output_blocks.append(level_block(level) + upsample)
        self.output_blocks = output_blocks
        self.out_0 = _group_norm(1e-5)
        self.out_2 = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, kernel_init=_ZEROS)

    def context(self, y: Array) -> Array:
        """The class context [B, 1, context_dim]: one token per label (`num_classes` is the null class)."""
        return self.class_embedder(jnp.asarray(y, jnp.int32))[:, None]

    def __call__(self, x: Array, t: Array, y: Array, *, train: bool = False) -> Array:
        """eps [B, H, W, out_channels] (float32) for latents x [B, H, W, in_channels], timesteps t [B] (int or
        float, 0..999) and labels y [B]."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet: input of shape {tuple(x.shape)}, expected [B, H, W, {self.in_channels}]")
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"UNet: input of shape {tuple(x.shape)}: H and W must be divisible by {f} "
                             f"(channel_mult={self.channel_mult})")
        if np.shape(t) != x.shape[:1] or np.shape(y) != x.shape[:1]:
            raise ValueError(f"UNet: t {np.shape(t)} and y {np.shape(y)} must both be [B] with B={x.shape[0]}")
        emb = self.time_embed_2(nn.silu(self.time_embed_0(timestep_embedding(t, self.model_channels))))
        context = self.context(y)
        h = self.input_blocks[0][0](x.astype(self.dtype))
        skips = [h]
        for block in self.input_blocks[1:]:
            for layer in block:
                h = layer(h, emb, context, train)
            skips.append(h)
        for layer in self.middle_block:
            h = layer(h, emb, context, train)
        for block in self.output_blocks:
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            for layer in block:
                h = layer(h, emb, context, train)
        return self.out_2(nn.silu(self.out_0(h))).astype(jnp.float32)
