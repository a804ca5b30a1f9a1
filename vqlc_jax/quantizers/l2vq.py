"""`l2vq`: FQGAN's sub-quantizer (LlamaGen's `VectorQuantizer` with `l2_norm`).

Latents and codes l2-normalised before the search, codebook loss `beta * mean((e - sg z)^2)` (1 in the release),
commitment `alpha * mean((sg e - z)^2)` (0.25) and the entropy penalty `entropy_weight * codebook_entropy_loss(-d,
temperature)` (0.03, 0.01), all in the normalised space; the codebook param `embedding` [N, D] is initialised
U(+-1/N) and normalised on use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vqlc_jax.losses import codebook_entropy_loss, quantization_loss
from vqlc_jax.quantizers.fc import l2_normalize
from vqlc_jax.sharded_ops import gather_rows
from vqlc_jax.quantizers.vq import VQQuantizer

Array = jax.Array


class L2VQQuantizer(VQQuantizer):
    """The FQGAN / LlamaGen l2-normalised VQ; see the module docstring. aux adds `codebook_loss`,
    `commitment_loss` and `entropy_loss` (weighted); `quant_loss` is their sum."""

    alpha: float = 0.25
    beta: float = 1.0
    entropy_weight: float = 0.03
    entropy_temperature: float = 0.01

    def to_search_space(self, z: Array) -> Array:
        return l2_normalize(z)

    def search_table(self) -> Array:
        return l2_normalize(self.embedding)

    def lookup(self, indices: Array) -> Array:
        return l2_normalize(gather_rows(self.embedding, indices))

    def quantize(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
        zq, indices, aux = super().quantize(z)
        zs, codes = self.to_search_space(z), self.lookup(indices)
        terms = {"codebook_loss": quantization_loss(zs, codes, alpha=0.0, beta=self.beta),
                 "commitment_loss": quantization_loss(zs, codes, alpha=self.alpha, beta=0.0),
                 "entropy_loss": jnp.zeros((), zs.dtype)}
        if self.entropy_weight:
            flat, table = zs.reshape(-1, zs.shape[-1]), self.search_table()
            distances = (jnp.sum(flat * flat, axis=1, keepdims=True) + jnp.sum(table * table, axis=1)
                         - 2 * jnp.dot(flat, table.T, precision=jax.lax.Precision.HIGHEST))
            terms["entropy_loss"] = self.entropy_weight * codebook_entropy_loss(
                -distances, temperature=self.entropy_temperature)
        return zq, indices, {**aux, **terms, "quant_loss": sum(terms.values())}
