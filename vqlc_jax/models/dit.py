"""DiT: the diffusion transformer of DiT (facebookresearch/DiT `models.py`, as the VQGAN-LC release's `dit-lc` uses
it), NHWC.

Patch embedding (a stride-p conv) plus fixed 2-D sin-cos positions, conditioning `c = t_embedder(t) +
y_embedder(y)`, adaLN-Zero blocks, a final adaLN layer and `unpatchify`. With `learn_sigma` the output has 2C
channels: eps first, then the variance values of the learned-range variance. The label table has a last row for the
null class (label `num_classes`) that classifier-free guidance uses; label dropout is the trainer's
(`vqlc_jax.generators.ar.drop_labels`). Parameter names follow the release's state dict (`blocks_i/attn/qkv`,
`adaLN_modulation_1`, `final_layer/linear`, ...), so `vqlc_jax.convert.official_dit` maps it without a table.

A fresh model is DiT's init: xavier-uniform linears (the patch conv as a linear), zero biases, N(0, 0.02) label
table and timestep-MLP weights, zero adaLN modulations and final linear, so it predicts 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# name -> (depth, width, heads); patch 2 for all (DiT-S/2 ... DiT-XL/2).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
FREQUENCY_SIZE = 256
_XAVIER = nn.initializers.xavier_uniform()
_NORMAL = nn.initializers.normal(0.02)
_ZEROS = nn.initializers.zeros


def sincos_pos_embed_2d(width: int, grid: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table [grid * grid, width] (float32), positions row-major (h, w).

    As the release (`np.meshgrid(grid_w, grid_h)` puts w first): the first half of the features encodes the column
    w, the second the row h; each half is [sin, cos] at frequencies `10000 ** -(k / (width / 4))`.
    """
    if width % 4:
        raise ValueError(f"sin-cos position table: width={width} is not divisible by 4")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def timestep_embedding(t: Array, dim: int = FREQUENCY_SIZE, max_period: float = 10000.0) -> Array:
    """[B, dim] float32 features `[cos(t f), sin(t f)]`, `f_i = exp(-ln(max_period) i / (dim / 2))` (cos first, as
    GLIDE/DiT); t may be fractional. An odd `dim` gets a zero last column."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """`x (1 + scale) + shift` with per-example shift/scale [B, D] over tokens x [B, T, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(1e-6, dtype=dtype, use_bias=False, use_scale=False, name=name)


class TimestepEmbedder(nn.Module):
    """`mlp_2(silu(mlp_0(timestep_embedding(t, 256))))`."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        h = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_NORMAL, name="mlp_0")(timestep_embedding(t))
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_NORMAL, name="mlp_2")(nn.silu(h))


class PatchEmbed(nn.Module):
    """Stride-p conv `proj` over x [B, H, W, C] -> tokens [B, (H/p)(W/p), hidden], patches row-major; initialised
    as a linear over each flattened patch (fan_in p*p*C), as DiT does."""

    hidden_size: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        h = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=kernel_init, name="proj")(x.astype(self.dtype))
        return h.reshape(h.shape[0], -1, self.hidden_size)


class LabelEmbedder(nn.Module):
    """`embedding_table` of num_classes + 1 rows (the last: the null class), N(0, 0.02)."""

    num_classes: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: Array) -> Array:
        table = nn.Embed(self.num_classes + 1, self.hidden_size, dtype=self.dtype, embedding_init=_NORMAL,
                         name="embedding_table")
        return table(jnp.asarray(y, jnp.int32))


class Attention(nn.Module):
    """timm's `Attention`: fused `qkv` (features ordered q|k|v, head, head_dim), softmax(q k^T / sqrt(d)) v in
    float32, `proj`."""

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        qkv = nn.Dense(3 * self.hidden_size, dtype=self.dtype, kernel_init=_XAVIER, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(*x.shape[:2], 3, self.num_heads, -1), 2, 0)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[0], x.shape[1], -1)
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_XAVIER, name="proj")(y)


class Mlp(nn.Module):
    """`fc2(gelu_tanh(fc1(x)))`."""

    hidden_size: int
    mlp_hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.gelu(nn.Dense(self.mlp_hidden, dtype=self.dtype, kernel_init=_XAVIER, name="fc1")(x), approximate=True)
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_XAVIER, name="fc2")(h)


class DiTBlock(nn.Module):
    """adaLN-Zero block: `adaLN_modulation_1(silu(c))` gives shift/scale/gate for attention, then for the MLP;
    `x += gate_msa attn(modulate(norm1(x)))`, `x += gate_mlp mlp(modulate(norm2(x)))`; LayerNorms eps 1e-6
    without affine."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        modulation = nn.Dense(6 * self.hidden_size, dtype=self.dtype, kernel_init=_ZEROS, name="adaLN_modulation_1")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation(nn.silu(c)), 6, -1)
        h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * Attention(self.hidden_size, self.num_heads, self.dtype, name="attn")(h)
        h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        mlp = Mlp(self.hidden_size, int(self.hidden_size * self.mlp_ratio), self.dtype, name="mlp")
        return x + gate_mlp[:, None] * mlp(h)


class FinalLayer(nn.Module):
    """`linear(modulate(norm_final(x), shift, scale))` with (shift, scale) = `adaLN_modulation_1(silu(c))`."""

    hidden_size: int
    out_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        modulation = nn.Dense(2 * self.hidden_size, dtype=self.dtype, kernel_init=_ZEROS, name="adaLN_modulation_1")
        shift, scale = jnp.split(modulation(nn.silu(c)), 2, -1)
        x = modulate(_layer_norm(self.dtype, "norm_final")(x), shift, scale)
        return nn.Dense(self.out_features, dtype=self.dtype, kernel_init=_ZEROS, name="linear")(x)


class DiT(nn.Module):
    """Class-conditional diffusion transformer on latents [B, input_size, input_size, in_channels].

    Parameters stay float32; `dtype` is the compute dtype (attention scores and softmax in float32; the output is
    float32). `remat` checkpoints each block. Labels run over 0..num_classes, the last being the null class.
    """

    input_size: int
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 8
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        super().__post_init__()

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    def setup(self):
        self.x_embedder = PatchEmbed(self.hidden_size, self.patch_size, self.dtype)
        self.t_embedder = TimestepEmbedder(self.hidden_size, self.dtype)
        self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size, self.dtype)
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        self.blocks = [block(self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype) for _ in range(self.depth)]
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size ** 2 * self.out_channels, self.dtype)

    def conditioning(self, t: Array, y: Array) -> Array:
        """c [B, hidden] = `t_embedder(t) + y_embedder(y)` (y may be the null class `num_classes`)."""
        return self.t_embedder(t) + self.y_embedder(y)

    def tokens(self, x: Array) -> Array:
        """[B, T, hidden]: patch embedding plus the fixed sin-cos positions."""
        pos = sincos_pos_embed_2d(self.hidden_size, self.grid)
        return self.x_embedder(x) + jnp.asarray(pos).astype(self.dtype)

    def unpatchify(self, x: Array) -> Array:
        """[B, T, p*p*C_out] with features ordered (p, q, c) -> [B, H, W, C_out]."""
        p, g = self.patch_size, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(x.shape[0], g * p, g * p, self.out_channels)

    def __call__(self, x: Array, t: Array, y: Array, *, train: bool = False) -> Array:
        """The release's `DiT.forward` in NHWC: x [B, H, W, C], t [B] timesteps (int or float), y [B] int labels
        -> [B, H, W, C_out] float32. `train` is accepted for the trainer's uniform call; DiT has no dropout."""
        del train
        want = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"DiT: input of shape {tuple(x.shape)}, expected [B, {want[0]}, {want[1]}, {want[2]}]")
        if np.shape(t) != x.shape[:1] or np.shape(y) != x.shape[:1]:
            raise ValueError(f"DiT: t {np.shape(t)} and y {np.shape(y)} must both be [B] with B={x.shape[0]}")
        h, c = self.tokens(x), self.conditioning(t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c)).astype(jnp.float32)

    def forward_with_cfg(self, x: Array, t: Array, y: Array, scale: float, *, channels: int | None = None) -> Array:
        """The release's `forward_with_cfg` for rows [conditional | null] (2B): the model runs on the first half of
        x twice (the second half is ignored, as released) and the output is `guided_output` of it."""
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half]), t, y)
        return guided_output(out, scale, eps_channels=self.in_channels, channels=channels)


def guided_output(out: Array, scale: float, *, eps_channels: int, channels: int | None = None) -> Array:
    """Classifier-free guidance on a model output [2B, ..., C_out] (conditional rows first, then the null rows).

    The first `channels` channels (None: all `eps_channels`; 3 reproduces the release) become
    `g = u + scale (c - u)` in both halves; every other channel is left as it is (the release keeps the
    conditional rest in the first half and the unconditional rest in the second).
    """
    k = eps_channels if channels is None else channels
    if not 0 < k <= eps_channels:
        raise ValueError(f"guided_output: channels={channels} must lie in [1, {eps_channels}] (the eps channels)")
    if isinstance(scale, (int, float)) and scale < 1:
        raise ValueError(f"guided_output: guidance scale {scale} < 1 (1 means no guidance)")
    if out.shape[0] % 2:
        raise ValueError(f"guided_output: {out.shape[0]} rows; expected [conditional | null] halves")
    cond, uncond = jnp.split(out[..., :k], 2)
    guided = uncond + scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([guided, guided]), out[..., k:]], axis=-1)


def guided_model_fn(apply_fn: Callable[[Array, Array, Array], Array], labels: Array,
                    scale: float | Callable[[Array], Array], *, null_label: int, eps_channels: int,
                    channels: int | None = None) -> Callable[[Array, Array], Array]:
    """A sampler's `model_fn(x [B], t [B]) -> [B, ..., C_out]` guided for `labels` [B]: `apply_fn(x, t, y)` runs the
    conditional and the null rows as one batch of 2B; the first half of `guided_output` is returned (the rows the
    release keeps, with the conditional rest channels). `scale` may be a function of t [B] (e.g. guidance in an
    interval of noise levels only)."""
    labels = jnp.asarray(labels, jnp.int32)
    y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

    def model_fn(x: Array, t: Array) -> Array:
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
        s = scale(t).reshape(t.shape + (1,) * (x.ndim - 1)) if callable(scale) else scale
        return guided_output(out, s, eps_channels=eps_channels, channels=channels)[: x.shape[0]]

    return model_fn
