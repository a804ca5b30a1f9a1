"""Nearest-code search by squared L2, chunked over the codebook so that large codebooks fit in memory.

A distance is sum_k (z_k - e_k)^2 added strictly left to right in element-wise f32 ops: the same squared L2 as the
release's |z|^2 + |e|^2 - 2 z.e, without its cancellation, and bitwise independent of the chunking. The expansion is
not (measured on XLA:CPU): dots round differently per operand shape, and XLA contracts the multiply-adds of |z|^2,
|e|^2 and z.e into FMAs or not depending on the fusion each lands in, whereas here every op of a distance sits in the
chunk's fused (min, argmin) reduction whatever the chunking. So chunked and unchunked searches of the same arrays
agree bitwise (tested); inside a larger jit, XLA may still fuse the computation of z or of the codebook (e.g. an
l2-normalisation) into a one-chunk search and round those inputs differently. Element-wise f32 also means no
TF32/bf16 passes on any backend, and a chunk's [T, C] distances are never written to memory. The feature axis is
unrolled, which suits the small latent dims of these models (D' = 8).

Two strategies give the same indices and bitwise the same distances: `reduce`, a fused variadic (min, argmin)
reduction over each chunk's [T, C] distances, and `fold`, which folds the codes one at a time into a running
(distance, index) per token with element-wise ops over the tokens (a scan over blocks of FOLD_BLOCK codes, unrolled
inside a block). XLA:CPU runs the variadic reduction slowly: at T = 4,096, D' = 8, `fold` takes 166 ms for 100,000
codes against 768 ms (benchmarks/train_step.py), so `auto` picks `fold` on CPU for D <= FOLD_MAX_DIM and `reduce`
elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vqlc_jax.sharded_ops import iota_like, replicate

Array = jax.Array

DEFAULT_CHUNK_SIZE = 16384
METHODS = ("auto", "reduce", "fold")
FOLD_BLOCK = 32  # codes per scan iteration of `fold` (unrolled: compile time grows with it)
FOLD_MAX_DIM = 16  # `auto` folds only small latent dims (the feature axis is unrolled too)


def squared_l2(a: Array, b: Array) -> Array:
    """sum_k (a[..., k] - b[..., k])^2 (broadcasting), added strictly left to right."""
    diff = a[..., 0] - b[..., 0]
    total = diff * diff
    for k in range(1, a.shape[-1]):
        diff = a[..., k] - b[..., k]
        total = total + diff * diff
    return total


def _min_first(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
    """Reducer for (distance, index) pairs: the smaller distance, the lower index on a tie (as jnp.argmin)."""
    take_a = (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
    return jnp.where(take_a, a[0], b[0]), jnp.where(take_a, a[1], b[1])


def _chunk_nearest(z: Array, chunk: Array) -> tuple[Array, Array]:
    """(index int32 [T], distance [T]) of the nearest code in one chunk [C, D], lowest index on ties."""
    dist = squared_l2(z[:, None, :], chunk[None, :, :])
    best_dist, best_idx = jax.lax.reduce((dist, iota_like(dist, 1)), (jnp.inf, jnp.int32(0)), _min_first, (1,))
    return best_idx, best_dist


def _fold_nearest(z: Array, codebook: Array) -> tuple[Array, Array]:
    """`fold` (see the module docstring): the codes in index order, each compared with a strict `<` against the
    running best of every token, so ties keep the lowest index. At most a few [T] vectors exist at a time."""
    num_codes, dim = codebook.shape
    num_blocks = -(-num_codes // FOLD_BLOCK)
    blocks = jnp.pad(codebook, ((0, num_blocks * FOLD_BLOCK - num_codes), (0, 0)), constant_values=jnp.inf)

    def step(carry: tuple[Array, Array], block_inputs: tuple[Array, Array]) -> tuple[tuple[Array, Array], None]:
        best_idx, best_dist = carry
        codes, start = block_inputs
        for b in range(FOLD_BLOCK):
            dist = squared_l2(z, codes[b])  # [T]: one code against every token
            better = dist < best_dist
            best_dist = jnp.where(better, dist, best_dist)
            best_idx = jnp.where(better, start + b, best_idx)
        return (best_idx, best_dist), None

    init = (jnp.zeros_like(z[:, 0], jnp.int32), jnp.full_like(z[:, 0], jnp.inf))
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * FOLD_BLOCK
    (best_idx, best_dist), _ = jax.lax.scan(step, init, (blocks.reshape(num_blocks, FOLD_BLOCK, dim), starts))
    return best_idx, best_dist


@functools.partial(jax.jit, static_argnames=("chunk_size", "method"))
def nearest_codes(z: Array, codebook: Array, *, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                  method: str = "auto") -> tuple[Array, Array]:
    """Index and squared L2 distance of the nearest codebook row for each latent.

    Args:
      z: latents [T, D].
      codebook: codes [N, D].
      chunk_size: codes per chunk of `reduce`; at most T x chunk_size distances exist at a time. None: one chunk.
      method: "reduce", "fold" (same results; see the module docstring) or "auto" (fold on CPU for small D).

    Returns:
      (indices int32 [T], squared_distances float32 [T]); ties go to the lowest index, as `jnp.argmin`, and the
      result does not depend on `chunk_size`. Not differentiable (the inputs are wrapped in stop_gradient).
    """
    if z.ndim != 2 or codebook.ndim != 2:
        raise ValueError(f"nearest_codes: expected z [T, D] and codebook [N, D], got {z.shape} and {codebook.shape}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_codes: latent dim {z.shape[1]} != codebook dim {codebook.shape[1]}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"nearest_codes: chunk_size must be a positive int or None, got {chunk_size}")
    if method not in METHODS:
        raise ValueError(f"nearest_codes: unknown method {method!r}; choices: {', '.join(METHODS)}")
    z = jax.lax.stop_gradient(z).astype(jnp.float32)
    codebook = replicate(jax.lax.stop_gradient(codebook).astype(jnp.float32))  # N x D: small next to the search
    num_codes, dim = codebook.shape
    if method == "auto":
        method = "fold" if jax.default_backend() == "cpu" and dim <= FOLD_MAX_DIM else "reduce"
    if method == "fold":
        return _fold_nearest(z, codebook)
    chunk_size = num_codes if chunk_size is None else min(chunk_size, num_codes)
    num_chunks = -(-num_codes // chunk_size)
    # Padding codes are +inf: their distances are +inf, never below a running minimum.
    chunks = jnp.pad(codebook, ((0, num_chunks * chunk_size - num_codes), (0, 0)), constant_values=jnp.inf)
    chunks = chunks.reshape(num_chunks, chunk_size, dim)
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

    def step(carry: tuple[Array, Array], chunk_inputs: tuple[Array, Array]) -> tuple[tuple[Array, Array], None]:
        best_idx, best_dist = carry
        chunk, start = chunk_inputs
        idx, dist = _chunk_nearest(z, chunk)
        better = dist < best_dist  # strict: on a tie the earlier chunk (lower index) keeps it
        return (jnp.where(better, idx + start, best_idx), jnp.where(better, dist, best_dist)), None

    init = (jnp.zeros_like(z[:, 0], jnp.int32), jnp.full_like(z[:, 0], jnp.inf))  # sharded like z
    (best_idx, best_dist), _ = jax.lax.scan(step, init, (chunks, starts))
    return best_idx, best_dist
