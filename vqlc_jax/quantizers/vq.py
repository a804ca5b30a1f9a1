"""VQGAN: a trainable codebook in latent space, learned through the quantization loss."""

from __future__ import annotations

import jax

from vqlc_jax.quantizers.base import Quantizer, uniform_init
from vqlc_jax.sharded_ops import gather_rows

Array = jax.Array


class VQQuantizer(Quantizer):
    """Codebook param `embedding` [num_codes, embed_dim], initialised U(-1/N, 1/N) as taming / the release."""

    def setup(self) -> None:
        self.embedding = self.param("embedding", uniform_init(1.0 / self.num_codes), (self.num_codes, self.embed_dim))

    def search_table(self) -> Array:
        return self.embedding

    def lookup(self, indices: Array) -> Array:
        return gather_rows(self.embedding, indices)
