"""The interface every quantizer shares: search, straight-through output, quantization loss."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc_jax.losses import quantization_loss
from vqlc_jax.quantizers.search import DEFAULT_CHUNK_SIZE, nearest_codes

Array = jax.Array
Initializer = Callable[..., Array]


def straight_through(z: Array, zq: Array) -> Array:
    """zq in the forward pass, identity gradient to z in the backward pass: z + sg(zq - z)."""
    return z + jax.lax.stop_gradient(zq - z)


def uniform_init(bound: float) -> Initializer:
    """Initializer drawing from U(-bound, bound)."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Quantizer(nn.Module):
    """Base of all quantizers: `zq, indices, aux = quantizer(z, train=False)`.

    z [..., embed_dim] (NHWC latents after quant_conv) -> zq like z (straight-through: forward value is the code,
    gradient to z is the identity, in the search space), indices int32 z.shape[:-1], aux {'quant_loss': scalar,
    'squared_distances': z.shape[:-1]}. `embed(indices)` decodes tokens to [..., embed_dim] and
    `codebook_vectors()` gives the effective codebook [num_codes, embed_dim].

    Subclasses define the codebook in the space where codes are searched (`search_table`, `lookup`) and, when that
    space is not the latent space, the maps into and out of it (`to_search_space`, `to_latent`).
    """

    num_codes: int
    embed_dim: int
    alpha: float = 1.0
    beta: float = 0.33
    chunk_size: int | None = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if self.num_codes < 1 or self.embed_dim < 1:
            raise ValueError(f"{type(self).__name__}: num_codes and embed_dim must be positive, "
                             f"got {self.num_codes} and {self.embed_dim}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"{type(self).__name__}: chunk_size must be positive or None, got {self.chunk_size}")
        super().__post_init__()

    def search_table(self) -> Array:
        """All codes [num_codes, d] in the search space (used under stop_gradient)."""
        raise NotImplementedError

    def lookup(self, indices: Array) -> Array:
        """Codes [..., d] for `indices`, computed from the selected rows only (gradients cost len(indices) rows)."""
        raise NotImplementedError

    def to_search_space(self, z: Array) -> Array:
        """Latents [..., embed_dim] -> search space [..., d]."""
        return z

    def to_latent(self, codes: Array) -> Array:
        """Search space [..., d] -> latents [..., embed_dim]."""
        return codes

    def embed(self, indices: Array) -> Array:
        """Token indices [...] -> latents [..., embed_dim]."""
        return self.to_latent(self.lookup(indices))

    def codebook_vectors(self) -> Array:
        """The effective codebook in latent space, [num_codes, embed_dim]."""
        return self.to_latent(self.search_table())

    def quantize(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
        """The shared forward pass; see the class docstring."""
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"{type(self).__name__}: latents have {z.shape[-1]} channels, expected embed_dim="
                             f"{self.embed_dim} (shape {z.shape})")
        zs = self.to_search_space(z)
        table = jax.lax.stop_gradient(self.search_table())
        indices, distances = nearest_codes(zs.reshape(-1, zs.shape[-1]), table, chunk_size=self.chunk_size)
        indices = indices.reshape(z.shape[:-1])
        codes = self.lookup(indices)
        aux = {
            "quant_loss": quantization_loss(zs, codes, alpha=self.alpha, beta=self.beta),
            "squared_distances": distances.reshape(z.shape[:-1]),
        }
        return self.to_latent(straight_through(zs, codes)), indices, aux

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
        return self.quantize(z)
