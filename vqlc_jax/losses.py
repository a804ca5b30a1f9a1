"""Training losses as pure functions of arrays (no state, jittable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def quantization_loss(z: Array, zq: Array, *, alpha: float = 1.0, beta: float = 0.33) -> Array:
    """alpha * mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2): commitment term (trains the encoder) plus
    codebook term (trains whatever produced zq). Paper Eq. 1 uses alpha=1, beta=0.33."""
    sg = jax.lax.stop_gradient
    commitment = jnp.mean(jnp.square(sg(zq) - z))
    codebook = jnp.mean(jnp.square(zq - sg(z)))
    return alpha * commitment + beta * codebook
