"""FAR: factorized autoregressive generation over the k sub-codebook token maps of a factorized tokenizer (FQGAN).

The FQGAN release's `autoregressive/models/far_{dual,triple}.py`, for any k >= 1 and per-sub-codebook vocabularies:

- input: at each image position t, the k sub-codes (c_1t .. c_kt) are embedded by one table per sub-codebook
  (`tok_embeddings_j`), concatenated and mixed by `aggregation_layer` (Linear k*W -> W, with bias); the sequence
  `[cls_embedding(label), agg_0, .., agg_{T-2}]` runs through the LlamaGen backbone (`vqlc_jax.models.gpt`'s
  `LlamaBlock`: RMSNorm, SwiGLU, 2-D RoPE; the class slot's RoPE entry is zeros) and gives h_t, which predicts
  position t;
- factorized AR head: per position, the short sequence `[h_t, emb_1(c_1t), .., emb_{k-1}(c_{k-1,t})]` runs causally
  through `head_layers` blocks of the same type with RoPE slots 0..k-1 of the same table (slot 0 zeros, slot 1 the
  grid's (0, 0), that is identity, as the release); then the shared final `norm`, and slot j-1 through `output_j`
  gives the logits of sub-codebook j.

Labels are class ids in [0, num_classes]; `num_classes` is the null class (classifier-free guidance). Parameter names
follow the release's state dict (`tok_embeddings_1`, `aggregation_layer`, `layers_i`, `ar_head_i`, `norm`,
`output_1`, ...). `context_step` and `head_step` decode one position / one sub-token against KV caches
(`init_cache`); they equal the full forward.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc_jax.models.gpt import LlamaBlock, rope_table_2d

Array = jax.Array
Cache = dict[str, list[dict[str, Array]]]
_INIT = nn.initializers.normal(0.02)  # the release's init of every Linear and Embedding


def stack_tokens(tokens: Array | Sequence[Array]) -> Array:
    """Sub-token maps as int32 [B, k, T]: from [B, k, T], [B, k, h, w] or a list of k [B, T] / [B, h, w] arrays
    (the release's `idx_1, idx_2, ...`)."""
    if isinstance(tokens, (list, tuple)):
        tokens = jnp.stack([jnp.asarray(t) for t in tokens], 1)
    tokens = jnp.asarray(tokens, jnp.int32)
    return tokens.reshape(*tokens.shape[:2], -1)


class FAR(nn.Module):
    """FAR over k sub-codebooks of sizes `codebook_sizes`; logits: a tuple of k arrays [B, T, V_j].

    `block_size` = 1 + T (the class slot and a square grid of T positions). `zero_head`: output heads start at zero
    (the release); otherwise N(0, 0.02). Parameters stay float32; `dtype` is the compute dtype; `remat`
    checkpoints each block. `multiple_of` rounds the SwiGLU width `int(8 W / 3)` up (LlamaGen: 256).
    """

    codebook_sizes: tuple[int, ...]
    num_classes: int
    block_size: int
    num_layers: int
    num_heads: int
    width: int
    head_layers: int
    dtype: Any = jnp.float32
    remat: bool = False
    dropout_rate: float = 0.0
    multiple_of: int = 256
    rope_base: float = 10000.0
    zero_head: bool = True

    def __post_init__(self):
        self.codebook_sizes = tuple(int(v) for v in self.codebook_sizes)
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise ValueError(f"FAR codebook_sizes={self.codebook_sizes}: need at least one positive size")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(f"FAR width={self.width}, num_heads={self.num_heads}: the head dim must be a multiple "
                             "of 4 (2-D RoPE)")
        if math.isqrt(self.block_size - 1) ** 2 != self.block_size - 1:
            raise ValueError(f"FAR block_size - 1 = {self.block_size - 1} image positions is not a square grid")
        if len(self.codebook_sizes) > self.block_size:
            raise ValueError(f"FAR: {len(self.codebook_sizes)} sub-codebooks need as many RoPE slots, more than "
                             f"block_size={self.block_size}")
        super().__post_init__()

    @property
    def num_codebooks(self) -> int:
        return len(self.codebook_sizes)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return -(-int(2 * 4 * self.width / 3) // self.multiple_of) * self.multiple_of

    def setup(self):
        block = nn.remat(LlamaBlock, static_argnums=(5,)) if self.remat else LlamaBlock
        make = lambda: block(self.width, self.num_heads, self.mlp_hidden, self.dtype, self.dropout_rate)  # noqa: E731
        embed = lambda n: nn.Embed(n, self.width, dtype=self.dtype, embedding_init=_INIT)  # noqa: E731
        self.cls_embedding = embed(self.num_classes + 1)
        for j, size in enumerate(self.codebook_sizes, 1):  # the release's 1-based names
            setattr(self, f"tok_embeddings_{j}", embed(size))
        self.aggregation_layer = nn.Dense(self.width, dtype=self.dtype, kernel_init=_INIT)
        self.drop = nn.Dropout(self.dropout_rate)
        self.layers = [make() for _ in range(self.num_layers)]
        self.ar_head = [make() for _ in range(self.head_layers)]
        self.norm = nn.RMSNorm(1e-5, dtype=self.dtype)
        head_init = nn.initializers.zeros if self.zero_head else _INIT
        for j, size in enumerate(self.codebook_sizes, 1):
            setattr(self, f"output_{j}", nn.Dense(size, use_bias=False, dtype=self.dtype, kernel_init=head_init))

    def _embed(self, sub: int, tokens: Array) -> Array:
        return getattr(self, f"tok_embeddings_{sub + 1}")(tokens)

    def _output(self, sub: int, features: Array) -> Array:
        return getattr(self, f"output_{sub + 1}")(features)

    def rope(self) -> Array:
        return jnp.asarray(rope_table_2d(math.isqrt(self.block_size - 1), self.head_dim, self.rope_base))

    def _aggregate(self, tokens: Array) -> tuple[Array, list[Array]]:
        """[B, k, T] -> (aggregated embeddings [B, T, W], the k per-sub-codebook embeddings [B, T, W])."""
        embeddings = [self._embed(j, tokens[:, j]) for j in range(self.num_codebooks)]
        return self.aggregation_layer(jnp.concatenate(embeddings, -1)), embeddings

    def _check(self, tokens: Array) -> None:
        if tokens.shape[1] != self.num_codebooks:
            raise ValueError(f"FAR: tokens of {tokens.shape[1]} sub-codebooks (shape {tokens.shape}), the model has "
                             f"{self.num_codebooks} ({self.codebook_sizes})")
        if tokens.shape[2] >= self.block_size:
            raise ValueError(f"FAR: {tokens.shape[2]} positions exceed block_size - 1 = {self.block_size - 1}")

    def features(self, labels: Array, tokens: Array | Sequence[Array], *, train: bool = False) -> Array:
        """Final-normed head features [B, T, k, W]: slot j predicts sub-codebook j (`output_j` of it)."""
        tokens = stack_tokens(tokens)
        self._check(tokens)
        deterministic = not train
        aggregated, embeddings = self._aggregate(tokens)
        x = jnp.concatenate([self.cls_embedding(labels)[:, None], aggregated[:, :-1]], 1)
        x = self.drop(x, deterministic=deterministic)
        rope = self.rope()
        for block in self.layers:
            x, _ = block(x, rope[: x.shape[1]], None, None, deterministic)
        b, t, w = x.shape
        head = jnp.stack([x, *embeddings[:-1]], 2).reshape(b * t, self.num_codebooks, w)
        for block in self.ar_head:
            head, _ = block(head, rope[: self.num_codebooks], None, None, deterministic)
        return self.norm(head).reshape(b, t, self.num_codebooks, w)

    def __call__(self, labels: Array, tokens: Array | Sequence[Array], *, train: bool = False) -> tuple[Array, ...]:
        """Logits (k arrays [B, T, V_j]) of the release's training forward for labels [B] and the sub-token maps
        (tokens: [B, k, T], [B, k, h, w] or a list of k [B, T]; they are inputs and targets, as in training)."""
        features = self.features(labels, tokens, train=train)
        return tuple(self._output(j, features[:, :, j]) for j in range(self.num_codebooks))

    # ---- Cached decoding. --------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int) -> Cache:
        """Zero KV caches: `context` per backbone layer [batch, heads, block_size, head_dim], `head` per head layer
        [batch, heads, k, head_dim] (its k slots are rewritten at every position). Needs no parameters."""
        def caches(layers, length):
            shape = (batch_size, self.num_heads, length, self.head_dim)
            return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in range(layers)]

        return {"context": caches(self.num_layers, self.block_size),
                "head": caches(self.head_layers, self.num_codebooks)}

    def _run_cached(self, blocks, x: Array, rope: Array, position: Array, cache):
        new_cache = []
        for block, layer in zip(blocks, cache):
            x, (k, v) = block(x, rope, (layer["k"], layer["v"]), position, True)
            new_cache.append({"k": k, "v": v})
        return x, new_cache

    def context_step(self, labels: Array, previous: Array, position: Array, cache: Cache) -> tuple[Array, Cache]:
        """Backbone output h [B, W] at `position` (a traced int32 scalar): the class embedding of `labels` [B] at
        position 0, else the aggregated embedding of the previous position's sub-tokens `previous` [B, k]."""
        aggregated = self._aggregate(previous[:, :, None])[0]
        x = jnp.where(position == 0, self.cls_embedding(labels)[:, None], aggregated)
        rope = jax.lax.dynamic_slice_in_dim(self.rope(), position, 1)
        x, context = self._run_cached(self.layers, x, rope, position, cache["context"])
        return x[:, 0], {**cache, "context": context}

    def head_step(self, x: Array, sub: int, cache: Cache) -> tuple[Array, Cache]:
        """Logits [B, V_sub] of sub-codebook `sub` (a Python int): `x` is h [B, W] for sub 0, else the sub-token
        [B] drawn for sub-codebook `sub - 1` at this position."""
        if sub:
            x = self._embed(sub - 1, x)
        rope = self.rope()[sub:sub + 1]
        x, head = self._run_cached(self.ar_head, x[:, None], rope, jnp.int32(sub), cache["head"])
        return self._output(sub, self.norm(x[:, 0])), {**cache, "head": head}
