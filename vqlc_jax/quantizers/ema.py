"""VQGAN-EMA: a codebook updated by exponential moving averages of the latents assigned to each code.

As the release: decay 0.99, eps 1e-5, Laplace smoothing of the cluster sizes, commitment-only loss
alpha * mean((sg(zq) - z)^2) (beta defaults to 0; the codebook gets no gradient either way), codebook init
U(-1/N, 1/N), `embed_sum` starting as a copy of it and `cluster_size` at zero; zq comes from the codebook before the
update. The state (`cluster_size` [N], `embed_sum` [N, D'], `embedding` [N, D']) lives in the collection
`'ema_state'` and is updated only when train=True and that collection is mutable (the release also updated it in
evaluation). Per-code sums are scatter-adds (segment sums, no one-hot); under a global-view jit with the batch
sharded across devices they sum over all devices, so every replica holds the same codebook (the release did not
all-reduce, and its ranks drifted apart).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vqlc_jax.quantizers.base import Quantizer, uniform_init
from vqlc_jax.sharded_ops import gather_rows, scatter_add_rows

Array = jax.Array

EMA_COLLECTION = "ema_state"


def ema_update(state: dict[str, Array], z: Array, indices: Array, *, decay: float, eps: float) -> dict[str, Array]:
    """New EMA state after assigning latents z [T, D] to codes `indices` [T].

    cluster_size <- decay * cluster_size + (1 - decay) * counts; embed_sum likewise with the per-code latent sums;
    embedding = embed_sum / smoothed, smoothed = (cluster_size + eps) / (n + N * eps) * n with n = sum(cluster_size).
    """
    num_codes = state["cluster_size"].shape[0]
    z = jax.lax.stop_gradient(z).astype(jnp.float32)
    counts = scatter_add_rows(num_codes, indices, jnp.ones_like(indices, jnp.float32))
    sums = scatter_add_rows(num_codes, indices, z)
    cluster_size = decay * state["cluster_size"] + (1.0 - decay) * counts
    embed_sum = decay * state["embed_sum"] + (1.0 - decay) * sums
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (n + num_codes * eps) * n
    return {"cluster_size": cluster_size, "embed_sum": embed_sum, "embedding": embed_sum / smoothed[:, None]}


class EMAQuantizer(Quantizer):
    """EMA-codebook quantizer; see the module docstring."""

    beta: float = 0.0
    decay: float = 0.99
    eps: float = 1e-5

    def setup(self) -> None:
        shape = (self.num_codes, self.embed_dim)
        self.embedding = self.variable(
            EMA_COLLECTION, "embedding", lambda: uniform_init(1.0 / self.num_codes)(self.make_rng("params"), shape))
        self.cluster_size = self.variable(EMA_COLLECTION, "cluster_size", jnp.zeros, (self.num_codes,), jnp.float32)
        self.embed_sum = self.variable(EMA_COLLECTION, "embed_sum", lambda: self.embedding.value)

    def search_table(self) -> Array:
        return self.embedding.value

    def lookup(self, indices: Array) -> Array:
        return gather_rows(self.embedding.value, indices)

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
        zq, indices, aux = self.quantize(z)
        if train and self.is_mutable_collection(EMA_COLLECTION) and not self.is_initializing():
            state = {"cluster_size": self.cluster_size.value, "embed_sum": self.embed_sum.value,
                     "embedding": self.embedding.value}
            new = ema_update(state, z.reshape(-1, self.embed_dim), indices.reshape(-1), decay=self.decay, eps=self.eps)
            self.cluster_size.value = new["cluster_size"]
            self.embed_sum.value = new["embed_sum"]
            self.embedding.value = new["embedding"]
        return zq, indices, aux
