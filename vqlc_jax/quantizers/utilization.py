"""Codebook usage statistics from per-code counts (a bincount, never a one-hot over the codebook).

Callers accumulate `code_counts` over an epoch or a split and summarise the sum. Under a global-view jit with the
batch sharded across devices, the counts are already the sum over all devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vqlc_jax.sharded_ops import scatter_add_rows

Array = jax.Array


@functools.partial(jax.jit, static_argnames="num_codes")
def code_counts(indices: Array, num_codes: int) -> Array:
    """int32 [num_codes]: how often each code occurs in `indices` (any shape, values in [0, num_codes)).

    A bincount written as a scatter-add, so that it also type-checks on a batch sharded over explicit mesh axes."""
    flat = indices.reshape(-1)
    return scatter_add_rows(num_codes, flat, jnp.ones_like(flat, jnp.int32))


def utilization(counts: Array) -> Array:
    """Share of codes used at least once."""
    return jnp.mean(counts > 0)


def perplexity(counts: Array) -> Array:
    """exp(entropy) of the usage distribution counts / sum(counts): the effective number of codes in use
    (1 when nothing was counted)."""
    counts = counts.astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)
