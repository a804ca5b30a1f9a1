"""Class-conditional GPT over token maps: the VQGAN-LC release's minGPT and a LlamaGen-style variant.

One id space for both variants: image codes 0..N-1, class ids N + label, the null class N + num_classes (only with
`null_class`, for classifier-free guidance). A sequence is `[N + label, t_0, t_1, ...]`.

- "mingpt" (the release, `vqgan-gpt-lc/models/mingpt.py`): one embedding table for codes and class ids, learned
  positions, pre-LayerNorm blocks (eps 1e-5) with exact-GELU MLPs, untied bias-free head over the whole vocabulary.
  Parameter names follow the release's state dict (`tok_emb`, `pos_emb`, `blocks_i/attn/query`, `mlp_0`, ...).
- "llamagen" (LlamaGen `autoregressive/models/gpt.py`): a class table of num_classes + 1 rows (the last is the null
  class) at position 0, a code table for the rest, RMSNorm, SwiGLU, 2-D RoPE on the h x w grid, no learned
  positions, head over the N codes. As in LlamaGen, the class slot's RoPE entry is all zeros, which zeroes that
  position's query and key (its key scores 0 for every query). Names follow LlamaGen (`layers_i/attention/wqkv`, ...).

`decode_step` runs one position against a KV cache (`init_cache`); it equals the full forward at every position.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
VARIANTS = ("mingpt", "llamagen")
_INIT = nn.initializers.normal(0.02)


def rope_table_2d(grid: int, head_dim: int, base: float = 10000.0, num_prefix: int = 1) -> np.ndarray:
    """LlamaGen's 2-D rotary table [num_prefix + grid**2, head_dim / 2, 2] of (cos, sin), float32.

    Grid slots are row-major (i, j); the first half of the rotary pairs turns with i, the second with j, at
    frequencies `base ** -(arange(0, head_dim / 2, 2) / (head_dim / 2))`. Prefix slots are all zeros (LlamaGen).
    """
    half = head_dim // 2
    freqs = 1.0 / base ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2] / half)
    angles = np.outer(np.arange(grid, dtype=np.float32), freqs)  # [grid, head_dim / 4]
    grid_angles = np.concatenate([np.repeat(angles[:, None], grid, 1), np.repeat(angles[None], grid, 0)], -1)
    table = np.stack([np.cos(grid_angles), np.sin(grid_angles)], -1).reshape(grid * grid, half, 2)
    return np.concatenate([np.zeros((num_prefix, half, 2), np.float32), table]).astype(np.float32)


def apply_rope(x: Array, table: Array) -> Array:
    """Rotates interleaved pairs (x[2k], x[2k+1]) of x [B, T, H, D] by table [T, D/2, 2] (cos, sin), in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).reshape(x.shape).astype(x.dtype)


def causal_attention(q: Array, k: Array, v: Array, kv: tuple[Array, Array] | None, position: Array | None,
                     dtype: Any) -> tuple[Array, tuple[Array, Array] | None]:
    """softmax(q k^T / sqrt(D) + causal mask) v for q, k, v [B, T, H, D]; scores and softmax in float32.

    Without `kv`: causal attention over the T positions. With `kv` = this layer's cache (keys, values)
    [B, H, S, D] and T = 1: the new key/value is written at `position` and attends over positions <= `position`.
    Returns the [B, T, H * D] output and the updated cache (None without one).
    """
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]
    if kv is None:
        keys, values = k, v
        mask = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
    else:
        start = (0, 0, position, 0)
        keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
        values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
        mask = (jnp.arange(keys.shape[2]) <= position)[None, :]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, keys, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", probs, values.astype(dtype))
    return out.reshape(*out.shape[:2], -1), None if kv is None else (keys, values)


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_INIT, name=name)


class MinGPTAttention(nn.Module):
    """The release's attention: separate `query`, `key`, `value` and `proj` Linears with biases; heads are
    contiguous slices of the width."""

    width: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, kv, position):
        q, k, v = (_dense(self.width, n, self.dtype)(x).reshape(*x.shape[:2], self.num_heads, -1)
                   for n in ("query", "key", "value"))
        y, kv = causal_attention(q, k, v, kv, position, self.dtype)
        return _dense(self.width, "proj", self.dtype)(y), kv


class MinGPTBlock(nn.Module):
    """`x + attn(ln1(x)); x + mlp(ln2(x))`, LayerNorm eps 1e-5, MLP `mlp_2(gelu(mlp_0(x)))` with exact GELU."""

    width: int
    num_heads: int
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, rope, kv, position, deterministic: bool):
        del rope  # learned positions are added to the embeddings
        y, kv = MinGPTAttention(self.width, self.num_heads, self.dtype, name="attn")(
            nn.LayerNorm(1e-5, dtype=self.dtype, name="ln1")(x), kv, position)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic)
        h = nn.LayerNorm(1e-5, dtype=self.dtype, name="ln2")(x)
        h = _dense(self.width, "mlp_2", self.dtype)(
            nn.gelu(_dense(4 * self.width, "mlp_0", self.dtype)(h), approximate=False))
        return x + nn.Dropout(self.dropout_rate)(h, deterministic), kv


class LlamaAttention(nn.Module):
    """LlamaGen's attention: fused bias-free `wqkv` (q | k | v, heads contiguous), RoPE on q and k, `wo`."""

    width: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rope, kv, position):
        qkv = _dense(3 * self.width, "wqkv", self.dtype, False)(x).reshape(*x.shape[:2], 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y, kv = causal_attention(apply_rope(q, rope), apply_rope(k, rope), v, kv, position, self.dtype)
        return _dense(self.width, "wo", self.dtype, False)(y), kv


class SwiGLU(nn.Module):
    """`w2(silu(w1 x) * w3 x)`, bias-free."""

    width: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate = nn.silu(_dense(self.hidden, "w1", self.dtype, False)(x))
        return _dense(self.width, "w2", self.dtype, False)(gate * _dense(self.hidden, "w3", self.dtype, False)(x))


class LlamaBlock(nn.Module):
    """LlamaGen's block: `h = x + attention(attention_norm(x)); h + feed_forward(ffn_norm(h))`, RMSNorm eps 1e-5."""

    width: int
    num_heads: int
    mlp_hidden: int
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, rope, kv, position, deterministic: bool):
        y, kv = LlamaAttention(self.width, self.num_heads, self.dtype, name="attention")(
            nn.RMSNorm(1e-5, dtype=self.dtype, name="attention_norm")(x), rope, kv, position)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic)
        h = SwiGLU(self.width, self.mlp_hidden, self.dtype, name="feed_forward")(
            nn.RMSNorm(1e-5, dtype=self.dtype, name="ffn_norm")(x))
        return x + nn.Dropout(self.dropout_rate)(h, deterministic), kv


class GPT(nn.Module):
    """Decoder-only transformer over `[class id, codes...]`; logits [B, T, output_size].

    `block_size` is the longest sequence including the class position (257 for 16x16 tokens). Parameters stay
    float32; `dtype` is the compute dtype (scores, softmax and norm statistics in float32). `remat` checkpoints
    each block. `multiple_of` rounds LlamaGen's SwiGLU width `int(8 W / 3)` up (LlamaGen: 256).
    """

    num_codes: int
    num_classes: int
    block_size: int
    num_layers: int
    num_heads: int
    width: int
    variant: str = "mingpt"
    null_class: bool = False
    dtype: Any = jnp.float32
    remat: bool = False
    dropout_rate: float = 0.0
    multiple_of: int = 256
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"GPT variant={self.variant!r}: choices: {', '.join(VARIANTS)}")
        if self.width % self.num_heads:
            raise ValueError(f"GPT width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.variant == "llamagen":
            grid = math.isqrt(self.block_size - 1)
            if grid * grid != self.block_size - 1:
                raise ValueError(f"llamagen GPT: block_size - 1 = {self.block_size - 1} image positions is not a "
                                 "square grid")
            if self.head_dim % 4:
                raise ValueError(f"llamagen GPT: head_dim={self.head_dim} must be divisible by 4 for 2-D RoPE")
        super().__post_init__()

    @property
    def vocab_size(self) -> int:
        """Input ids: N codes, the class ids and the null class when `null_class`."""
        return self.num_codes + self.num_classes + int(self.null_class)

    @property
    def output_size(self) -> int:
        """Head width: the whole vocabulary (mingpt, as the release) or the N codes (llamagen)."""
        return self.vocab_size if self.variant == "mingpt" else self.num_codes

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(2 * 4 * self.width / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    def setup(self):
        block = MinGPTBlock if self.variant == "mingpt" else LlamaBlock
        if self.remat:
            block = nn.remat(block, static_argnums=(5,))
        options = dict(width=self.width, num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout_rate)
        if self.variant == "llamagen":
            options["mlp_hidden"] = self.mlp_hidden
        blocks = [block(**options) for _ in range(self.num_layers)]
        embed = lambda n: nn.Embed(n, self.width, dtype=self.dtype, embedding_init=_INIT)  # noqa: E731
        if self.variant == "mingpt":
            self.tok_emb = embed(self.vocab_size)
            self.pos_emb = self.param("pos_emb", nn.initializers.zeros, (1, self.block_size, self.width))
            self.blocks = blocks
            self.ln_f = nn.LayerNorm(1e-5, dtype=self.dtype)
            head_init = _INIT
        else:
            self.tok_embeddings = embed(self.num_codes)
            self.cls_embedding = embed(self.num_classes + 1)
            self.layers = blocks
            self.norm = nn.RMSNorm(1e-5, dtype=self.dtype)
            head_init = nn.initializers.zeros  # LlamaGen zero-initialises its output layer
        self.drop = nn.Dropout(self.dropout_rate)
        self.head = nn.Dense(self.output_size, use_bias=False, dtype=self.dtype, kernel_init=head_init)

    def _blocks(self):
        return self.blocks if self.variant == "mingpt" else self.layers

    def _final_norm(self, x):
        return self.ln_f(x) if self.variant == "mingpt" else self.norm(x)

    def _rope(self) -> Array:
        return jnp.asarray(rope_table_2d(math.isqrt(self.block_size - 1), self.head_dim, self.rope_base))

    def hidden(self, idx: Array, *, train: bool = False) -> Array:
        """Final-normed features [B, T, W] of idx [B, T] (`idx[:, 0]` a class id); logits = `head(hidden)`."""
        length = idx.shape[1]
        if length > self.block_size:
            raise ValueError(f"GPT: sequence of {length} ids exceeds block_size={self.block_size}")
        if self.variant == "mingpt":
            x = self.tok_emb(idx) + self.pos_emb[:, :length].astype(self.dtype)
            rope = None
        else:
            x = jnp.concatenate([self.cls_embedding(idx[:, :1] - self.num_codes), self.tok_embeddings(idx[:, 1:])], 1)
            rope = self._rope()[:length]
        x = self.drop(x, deterministic=not train)
        for block in self._blocks():
            x, _ = block(x, rope, None, None, not train)
        return self._final_norm(x)

    def __call__(self, idx: Array, *, train: bool = False) -> Array:
        """Logits [B, T, output_size] of the release's forward (every position predicts the next id)."""
        return self.head(self.hidden(idx, train=train))

    def init_cache(self, batch_size: int) -> list[dict[str, Array]]:
        """Zero KV cache: per layer {'k', 'v'} [batch, heads, block_size, head_dim] in the compute dtype (separate
        buffers, so a compiled loop updates each in place). Needs no parameters: `model.init_cache(b)` works on the
        unbound module."""
        shape = (batch_size, self.num_heads, self.block_size, self.head_dim)
        return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in range(self.num_layers)]

    def decode_step(self, ids: Array, position: Array, cache: list[dict[str, Array]]
                    ) -> tuple[Array, list[dict[str, Array]]]:
        """Logits [B, output_size] at `position` (a traced int32 scalar) for `ids` [B] sitting there (a class id at
        position 0, codes after), attending over the cached positions before it; returns the updated cache."""
        ids = ids[:, None]
        if self.variant == "mingpt":
            pos = jax.lax.dynamic_slice_in_dim(self.pos_emb, position, 1, axis=1)
            x = self.tok_emb(ids) + pos.astype(self.dtype)
            rope = None
        else:
            cls = self.cls_embedding(jnp.clip(ids - self.num_codes, 0, self.num_classes))
            x = jnp.where(position == 0, cls, self.tok_embeddings(jnp.clip(ids, 0, self.num_codes - 1)))
            rope = jax.lax.dynamic_slice_in_dim(self._rope(), position, 1)
        new_cache = []
        for block, layer in zip(self._blocks(), cache):
            x, (k, v) = block(x, rope, (layer["k"], layer["v"]), position, True)
            new_cache.append({"k": k, "v": v})
        return self.head(self._final_norm(x))[:, 0], new_cache
