"""ViT over given token embeddings (timm's `VisionTransformer` as MAE fine-tunes it, the patch embedding left out).

`ViT(...)(token_embeddings [B, T, W])`: `x = [cls_token, tokens] + pos_embed` (learned, T + 1 positions), pre-norm
blocks `x + drop_path(attn(norm1(x)))`, `x + drop_path(mlp(norm2(x)))` (fused biased `qkv`, exact-GELU MLP,
LayerNorm eps 1e-6), then the pooling: `"token"` takes `norm(x)[:, 0]`; `"avg"` (MAE's fine-tuning default) has no
`norm` and takes `fc_norm(mean of the non-CLS tokens)`; `head` gives the logits. `method=ViT.features` ([B, T + 1,
W]: after `norm` for token pooling, the raw block output for avg pooling, as timm) and `method=ViT.pooled` ([B, W])
give the intermediate outputs. Stochastic depth (drop path, per sample, rate rising linearly over the blocks to
`drop_path_rate`) acts only with `train=True` and draws from the `dropout` rng stream.

Names follow MAE's / timm's state dict (`cls_token`, `pos_embed`, `blocks_3/attn/qkv`, `norm`, `fc_norm`, `head`),
so `convert.mae_weights` maps it with `default_path` and the block of a parameter is its `blocks_<i>` path entry.
Initialisation is MAE's: xavier-uniform linears, zero biases, N(0, 0.02) CLS token, truncated N(0, 0.02) positions,
the head truncated N(0, `head_init_std`) (2e-5, MAE's fine-tuning value).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.models.clip import MLP
from vqlc_jax.models.dit import Attention

Array = jax.Array
# name -> (depth, width, heads), as timm's vit_{tiny,small,base,large}_patch16.
VIT_SIZES = {"Ti": (12, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16)}
GLOBAL_POOLS = ("token", "avg")
LAYER_NORM_EPS = 1e-6
_XAVIER = nn.initializers.xavier_uniform()


def _layer_norm(dtype: Any, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(LAYER_NORM_EPS, dtype=dtype, use_fast_variance=False, name=name)


def drop_path(x: Array, rate: float, rng: Array) -> Array:
    """Stochastic depth: each example's `x` zeroed with probability `rate`, the kept ones scaled by 1 / (1 - rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


class Block(nn.Module):
    """timm's pre-norm `Block`: `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`."""

    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        def residual(h: Array) -> Array:
            if train and self.drop_path_rate > 0:
                h = drop_path(h, self.drop_path_rate, self.make_rng("dropout"))
            return x + h

        norm1 = _layer_norm(self.dtype, "norm1")
        x = residual(Attention(self.width, self.num_heads, self.dtype, name="attn")(norm1(x)))
        mlp = MLP(self.width, int(self.width * self.mlp_ratio), "gelu", self.dtype, precision=None,
                  kernel_init=_XAVIER, name="mlp")
        return residual(mlp(_layer_norm(self.dtype, "norm2")(x)))


class ViT(nn.Module):
    """Token-map classifier backbone; see the module docstring. `num_tokens` is T (256 for a 16 x 16 token map)."""

    num_tokens: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    global_pool: str = "token"
    drop_path_rate: float = 0.0
    head_init_std: float = 2e-5
    dtype: Any = jnp.float32

    def setup(self):
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"ViT: global_pool {self.global_pool!r} is not one of {GLOBAL_POOLS}")
        if self.width % self.num_heads:
            raise ValueError(f"ViT: width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"ViT: drop_path_rate {self.drop_path_rate} is not in [0, 1)")
        self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
        self.pos_embed = self.param(
            "pos_embed", nn.initializers.truncated_normal(0.02), (1, self.num_tokens + 1, self.width))
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        self.blocks = [Block(self.width, self.num_heads, self.mlp_ratio, float(rate), self.dtype) for rate in rates]
        if self.global_pool == "token":
            self.norm = _layer_norm(self.dtype)
        else:
            self.fc_norm = _layer_norm(self.dtype)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.truncated_normal(
            self.head_init_std))

    def features(self, token_embeddings: Array, *, train: bool = False) -> Array:
        """[B, T, W] token embeddings -> [B, T + 1, W] (CLS first): after `norm` for token pooling, else raw."""
        want = (self.num_tokens, self.width)
        if token_embeddings.ndim != 3 or token_embeddings.shape[1:] != want:
            raise ValueError(f"ViT: expected token embeddings [B, {want[0]}, {want[1]}], got {token_embeddings.shape}")
        x = token_embeddings.astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (x.shape[0], 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(self.dtype)
        for block in self.blocks:
            x = block(x, train)
        return self.norm(x) if self.global_pool == "token" else x

    def pooled(self, token_embeddings: Array, *, train: bool = False) -> Array:
        """[B, W]: the normed CLS token ("token") or `fc_norm` of the mean non-CLS token ("avg")."""
        x = self.features(token_embeddings, train=train)
        return x[:, 0] if self.global_pool == "token" else self.fc_norm(x[:, 1:].mean(axis=1))

    def __call__(self, token_embeddings: Array, *, train: bool = False) -> Array:
        """Logits [B, num_classes]."""
        return self.head(self.pooled(token_embeddings, train=train))
