"""Codebook usage statistics from per-code counts (a bincount, never a one-hot over the codebook).

Callers accumulate `code_counts` over an epoch or a split and summarise the sum. Under a global-view jit with the
batch sharded across devices, the counts are already the sum over all devices.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------------- k sub-codebooks (FQGAN)
# Tokens of a factorized tokenizer are [B, k, ...]; their counts lie end to end, sub-codebook 0 first.
def joint_ids(tokens, sizes: Sequence[int]):
    """Tokens [B, k, ...] of k sub-codebooks of `sizes` -> ids into the k codebooks laid end to end (numpy or jax,
    as given); with one codebook (or none named) the tokens [B, ...] unchanged."""
    if len(sizes) <= 1:
        return tokens
    offsets = np.cumsum((0, *sizes[:-1])).reshape(1, -1, *(1,) * (tokens.ndim - 2))
    return tokens + offsets.astype(tokens.dtype)


def split_counts(counts, sizes: Sequence[int]) -> list:
    """Counts of the codebooks laid end to end -> one array per sub-codebook."""
    return np.split(np.asarray(counts), np.cumsum(sizes)[:-1])


def out_of_range(tokens, sizes: Sequence[int]) -> tuple[int, int, int] | None:
    """(sub-codebook j, min, max) of the first sub-codebook whose tokens leave [0, sizes[j]), else None. Tokens
    [B, k, ...] for k > 1 sub-codebooks, [B, ...] for one."""
    for j, size in enumerate(sizes):
        part = tokens if len(sizes) == 1 else tokens[:, j]
        if part.size:
            lo, hi = int(part.min()), int(part.max())
            if lo < 0 or hi >= size:
                return j, lo, hi
    return None
