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


def reconstruction_loss(images: Array, reconstructions: Array, *, kind: str = "l1") -> Array:
    """Mean absolute (`l1`, the release) or squared (`l2`) error over all pixels."""
    diff = reconstructions - images
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"reconstruction_loss: unknown kind {kind!r}; choices: l1, l2")


def hinge_discriminator_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), taming's hinge loss."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adversarial_loss(logits_fake: Array) -> Array:
    """-mean(D(G(x))): the generator's hinge GAN term."""
    return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad: Array, gan_grad: Array, *, max_weight: float = 1e4) -> Array:
    """taming's adaptive GAN weight: |grad nll| / (|grad gan| + 1e-4), clipped to [0, max_weight], no gradient.

    Both gradients are taken with respect to the decoder's last layer."""
    weight = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))
