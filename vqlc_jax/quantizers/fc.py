"""VQGAN-FC: factorized, l2-normalised codes (ViT-VQGAN, Yu et al. 2022); not in the official release.

Choices made here:
  - Dense `to_code` maps latents [..., embed_dim] to `code_dim` (default 8), then l2-normalised; Dense `from_code`
    maps the straight-through codes back to embed_dim (both Flax default init, full f32 precision).
  - Codebook param `embedding` [num_codes, code_dim], initialised N(0, 1) (uniform directions on the sphere) and
    l2-normalised whenever used, so only its directions matter.
  - Nearest code by squared L2 between normalised vectors (= cosine similarity); the quantization loss is computed
    between the normalised latent and code, and the straight-through estimator acts in that space, so dzq/dz is
    from_code . to_code-with-normalisation, not the identity.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc_jax.quantizers.base import Quantizer
from vqlc_jax.sharded_ops import gather_rows

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(|x|, sqrt(eps)) along the last axis."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class FCQuantizer(Quantizer):
    """Factorized-code quantizer; see the module docstring."""

    code_dim: int = 8

    def setup(self) -> None:
        self.embedding = self.param("embedding", nn.initializers.normal(stddev=1.0), (self.num_codes, self.code_dim))
        self.to_code = nn.Dense(self.code_dim, precision=jax.lax.Precision.HIGHEST)
        self.from_code = nn.Dense(self.embed_dim, precision=jax.lax.Precision.HIGHEST)

    def to_search_space(self, z: Array) -> Array:
        return l2_normalize(self.to_code(z))

    def to_latent(self, codes: Array) -> Array:
        return self.from_code(codes)

    def search_table(self) -> Array:
        return l2_normalize(self.embedding)

    def lookup(self, indices: Array) -> Array:
        return l2_normalize(gather_rows(self.embedding, indices))
