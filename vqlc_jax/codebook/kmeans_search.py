"""Nearest centre for k-means by matmul: argmin_j |c_j|^2 - 2 x.c_j, in blocks of rows x centres.

`vqlc_jax.quantizers.nearest_codes` adds (z_k - e_k)^2 element-wise, feature by feature: exact and chunk-invariant,
made for the quantizer's small latent dims (D' = 8). k-means runs on 64- to 768-d features, where that is ~D times
slower than a matmul, so here the search is the release's expansion (|x|^2 dropped: it does not change the argmin).
Rows and centres are both blocked: a [row_chunk, chunk_size] score block stays in cache, which on CPU is 2-3x faster
than one [batch, k] block (the argmin, not the matmul, is the bottleneck there). The returned distances are exact
residuals |x - c|^2 of the chosen centre, computed afterwards, so only near-ties can differ from an exact search.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_ROW_CHUNK = 512
DOT_DTYPES = ("float32", "bfloat16")


def _row_block_nearest(x: Array, chunks: Array, norms: Array, dot_dtype: jnp.dtype) -> Array:
    """Nearest centre index int32 [R] of rows x [R, D] among chunks [nc, C, D] with norms [nc, C] (+inf = padding)."""
    chunk_size = chunks.shape[1]
    neg2x = (-2.0 * x).astype(dot_dtype)  # exact scaling, folded into the matmul operand
    starts = jnp.arange(chunks.shape[0], dtype=jnp.int32) * chunk_size

    def step(carry: tuple[Array, Array], inputs: tuple[Array, Array, Array]) -> tuple[tuple[Array, Array], None]:
        best_idx, best_score = carry
        chunk, norm, start = inputs
        score = norm[None, :] + jnp.dot(neg2x, chunk.T, preferred_element_type=jnp.float32)
        low = jnp.min(score, axis=1)
        # min then first position of the min: two plain reductions, faster on CPU than a fused (value, index) argmin.
        iota = jax.lax.broadcasted_iota(jnp.int32, score.shape, 1)
        idx = jnp.min(jnp.where(score == low[:, None], iota, chunk_size), axis=1) + start
        better = low < best_score  # strict: on a tie the earlier chunk (lower index) keeps it
        return (jnp.where(better, idx, best_idx), jnp.where(better, low, best_score)), None

    init = (jnp.zeros(x.shape[0], jnp.int32), jnp.full(x.shape[0], jnp.inf, jnp.float32))
    (best_idx, _), _ = jax.lax.scan(step, init, (chunks, norms, starts))
    return best_idx


@functools.partial(jax.jit, static_argnames=("chunk_size", "row_chunk", "dot_dtype"))
def nearest_centres(x: Array, centres: Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    row_chunk: int = DEFAULT_ROW_CHUNK, dot_dtype: str = "float32") -> tuple[Array, Array]:
    """Index of the nearest centre of each row and its squared L2 distance.

    Args:
      x: points [T, D].
      centres: [K, D].
      chunk_size: centres per block; row_chunk: rows per block. At most row_chunk x chunk_size scores exist at a time.
      dot_dtype: "float32", or "bfloat16" for the matmul's operands (accumulated in float32; norms stay float32).

    Returns:
      (labels int32 [T], squared distances float32 [T]): ties go to the lowest index; distances are the exact
      residuals sum_d (x_d - c_d)^2 of the chosen centre.
    """
    if x.ndim != 2 or centres.ndim != 2:
        raise ValueError(f"nearest_centres: expected x [T, D] and centres [K, D], got {x.shape} and {centres.shape}")
    if x.shape[1] != centres.shape[1]:
        raise ValueError(f"nearest_centres: point dim {x.shape[1]} != centre dim {centres.shape[1]}")
    if chunk_size < 1 or row_chunk < 1:
        raise ValueError(f"nearest_centres: chunk_size={chunk_size} and row_chunk={row_chunk} must be >= 1")
    if dot_dtype not in DOT_DTYPES:
        raise ValueError(f"nearest_centres: dot_dtype must be one of {DOT_DTYPES}, got {dot_dtype!r}")
    x = x.astype(jnp.float32)
    centres = centres.astype(jnp.float32)
    (num_rows, dim), num_centres = x.shape, centres.shape[0]
    chunk_size, row_chunk = min(chunk_size, num_centres), min(row_chunk, num_rows)
    num_chunks, num_blocks = -(-num_centres // chunk_size), -(-num_rows // row_chunk)
    pad = num_chunks * chunk_size - num_centres
    norms = jnp.pad(jnp.sum(centres * centres, axis=1), (0, pad), constant_values=np.inf)
    chunks = jnp.pad(centres, ((0, pad), (0, 0))).astype(dot_dtype).reshape(num_chunks, chunk_size, dim)
    blocks = jnp.pad(x, ((0, num_blocks * row_chunk - num_rows), (0, 0))).reshape(num_blocks, row_chunk, dim)
    labels = jax.lax.map(
        lambda block: _row_block_nearest(block, chunks, norms.reshape(num_chunks, chunk_size), jnp.dtype(dot_dtype)),
        blocks).reshape(-1)[:num_rows]
    residual = x - centres[labels]
    return labels, jnp.sum(residual * residual, axis=1)
