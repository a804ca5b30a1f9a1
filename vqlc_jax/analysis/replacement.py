"""Token replacement (Figure 5): replace every token by its M-th nearest code, decode, and measure the damage.

Ranking. For a code c, the codes of the projected codebook (`codebook_vectors()`, [N, D']) are ordered by squared
L2 distance to c, ties to the lower index, with c itself always first: the 1st nearest code is c itself, the M-th
(M >= 2) is the (M-1)-th nearest *other* code (so a duplicate of c never displaces it). M = 1 therefore decodes the
very tokens of the image: its output is bitwise the plain `decode(encode(x))`.

Reported per M, over all images: PSNR and SSIM against the originals (`evaluate.py`'s conventions: images in
[0, 1], decoded images clipped; per image, then averaged), the MSE against the plain (M = 1) reconstruction, and
the mean squared distance between each token's code and its replacement.

Memory. Only the codes that occur in the tokens get neighbours. Queries go in batches of `query_batch`, the codebook
in chunks of `chunk_size`; a running top-K of (distance, index) is merged with each chunk's distances by
`lax.top_k` over K + chunk_size, so at most query_batch x (K + chunk_size) distances exist at a time and no N x N
matrix is ever formed. Distances are `nearest_codes`' element-wise sums (`quantizers/search.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax import metrics
from vqlc_jax.analysis.tsne import projected_codebook
from vqlc_jax.quantizers.search import DEFAULT_CHUNK_SIZE, squared_l2
from vqlc_jax.tokenizer import Tokenizer

DEFAULT_RANKS = (1, 50, 100, 1000)
RANK_DEFINITION = ("M = 1: the token itself; M >= 2: the (M-1)-th nearest other code of the projected codebook "
                   "(squared L2, ties to the lower index)")
Batches = Callable[[], Iterable[np.ndarray]]  # each call: a fresh pass over image batches [B, H, W, C] in [-1, 1]


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _nearest_others(codebook: jax.Array, queries: jax.Array, *, k: int, chunk_size: int):
    """(indices int32 [q, k], squared distances [q, k]) of the k nearest codes to codebook[queries], self excluded,
    ordered by (distance, index)."""
    num_codes, dim = codebook.shape
    num_chunks = -(-num_codes // chunk_size)
    # Padding codes sit at +inf: infinitely far, never among the k nearest while k < num_codes.
    chunks = jnp.pad(codebook, ((0, num_chunks * chunk_size - num_codes), (0, 0)), constant_values=jnp.inf)
    chunks = chunks.reshape(num_chunks, chunk_size, dim)
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
    vectors = codebook[queries]

    def step(carry, chunk_inputs):
        best_neg, best_idx = carry
        chunk, start = chunk_inputs
        idx = start + jnp.arange(chunk_size, dtype=jnp.int32)
        dist = squared_l2(vectors[:, None, :], chunk[None, :, :])
        dist = jnp.where(idx[None, :] == queries[:, None], jnp.inf, dist)
        # The running best (all from earlier chunks, so lower indices) comes first: top_k's lower-position-first
        # rule then breaks distance ties towards the lower code index.
        neg = jnp.concatenate([best_neg, -dist], axis=1)
        ids = jnp.concatenate([best_idx, jnp.broadcast_to(idx, dist.shape)], axis=1)
        top, pos = jax.lax.top_k(neg, k)
        return (top, jnp.take_along_axis(ids, pos, axis=1)), None

    init = (jnp.full((queries.shape[0], k), -jnp.inf), jnp.full((queries.shape[0], k), -1, jnp.int32))
    (neg, idx), _ = jax.lax.scan(step, init, (chunks, starts))
    return idx, -neg


def nearest_other_codes(codebook: np.ndarray, queries: np.ndarray, k: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        query_batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Indices int32 [U, k] and squared distances [U, k] of the k nearest codes to each code in `queries` [U],
    itself excluded, nearest first (ties: lower index). Memory bounded as the module docstring says."""
    codebook = jnp.asarray(codebook, jnp.float32)
    queries = np.asarray(queries, np.int32)
    num_codes = codebook.shape[0]
    if not 1 <= k < num_codes:
        raise ValueError(f"nearest_other_codes: k={k} must lie in [1, {num_codes - 1}] (N={num_codes} codes)")
    if queries.ndim != 1 or queries.size and (queries.min() < 0 or queries.max() >= num_codes):
        raise ValueError(f"nearest_other_codes: queries must be code indices [U] in [0, {num_codes}), got "
                         f"shape {queries.shape}")
    batch = max(1, min(query_batch, queries.size))
    padded = np.pad(queries, (0, -queries.size % batch))
    found = [_nearest_others(codebook, jnp.asarray(padded[i:i + batch]), k=k, chunk_size=min(chunk_size, num_codes))
             for i in range(0, padded.size, batch)]
    indices = np.concatenate([np.asarray(i) for i, _ in found])[: queries.size]
    distances = np.concatenate([np.asarray(d) for _, d in found])[: queries.size]
    return indices, distances


def _check_ranks(ranks: Sequence[int], num_codes: int) -> None:
    if not ranks or any(not 1 <= m <= num_codes for m in ranks):
        raise ValueError(f"ranks {list(ranks)} must be non-empty and lie in [1, {num_codes}] (N={num_codes} codes)")


def rank_table(codebook: np.ndarray, codes: np.ndarray, ranks: Sequence[int], **search_options) -> np.ndarray:
    """int32 [U, len(ranks)]: column j holds the ranks[j]-th nearest code of each of `codes` [U] (1st = itself)."""
    _check_ranks(ranks, np.shape(codebook)[0])
    codes = np.asarray(codes, np.int32)
    k = max(ranks) - 1
    others = nearest_other_codes(codebook, codes, k, **search_options)[0] if k else None
    return np.stack([codes if m == 1 else others[:, m - 2] for m in ranks], axis=1)


def token_replacement(tok: Tokenizer, batches: Batches, ranks: Sequence[int] = DEFAULT_RANKS,
                      **search_options) -> list[dict[str, float]]:
    """One row per M in `ranks`: rank, psnr, ssim, mse_to_reconstruction, code_distance (module docstring).

    `batches()` is called twice (encode, then replace and decode) and must yield the same images both times."""
    _check_ranks(ranks, tok.num_codes)
    codebook = projected_codebook(tok)
    tokens = [np.asarray(tok.encode(images)) for images in batches()]
    if not tokens:
        raise ValueError("token_replacement: no images")
    codes = np.unique(np.concatenate([t.reshape(-1) for t in tokens]))
    table = rank_table(codebook, codes, ranks, **search_options)
    sums = np.zeros((len(ranks), 4), np.float64)  # psnr, ssim, mse (per image), code distance (per token)
    num_images = num_tokens = 0
    for images, batch_tokens in zip(batches(), tokens, strict=True):
        if images.shape[0] != batch_tokens.shape[0]:
            raise ValueError("token_replacement: batches() yielded different batches on its second pass")
        originals = (jnp.asarray(images) + 1) / 2
        plain = jnp.clip((tok.decode(batch_tokens) + 1) / 2, 0, 1)
        positions = np.searchsorted(codes, batch_tokens)
        for j in range(len(ranks)):
            replaced = table[positions, j]
            decoded = jnp.clip((tok.decode(replaced) + 1) / 2, 0, 1)
            sums[j, 0] += float(jnp.sum(metrics.psnr(originals, decoded)))
            sums[j, 1] += float(jnp.sum(metrics.ssim(originals, decoded)))
            sums[j, 2] += float(jnp.sum(jnp.mean((decoded - plain) ** 2, axis=(1, 2, 3))))
            sums[j, 3] += float(np.sum((codebook[replaced] - codebook[batch_tokens]) ** 2))
        num_images += images.shape[0]
        num_tokens += batch_tokens.size
    means = sums / np.array([num_images, num_images, num_images, num_tokens])
    return [{"rank": int(m), "psnr": float(row[0]), "ssim": float(row[1]), "mse_to_reconstruction": float(row[2]),
             "code_distance": float(row[3])} for m, row in zip(ranks, means)]


def eval_batches(data: ml_collections.ConfigDict, batch_size: int) -> Batches:
    """Passes over `data.eval_split` of `data.name` (at most `data.eval_max_images` images when > 0), as
    `evaluate.py` reads it (centre crops at `data.resolution`, padding rows dropped); one process."""
    from vqlc_jax import data as data_lib

    source = data_lib.make_source(data.name, data.eval_split, data.options)
    if data.eval_max_images:
        source = data_lib.Subset(source, data.eval_max_images)

    def batches() -> Iterator[np.ndarray]:
        pipeline = data_lib.make_pipeline(source, resolution=data.resolution, global_batch_size=batch_size, seed=0,
                                          train=False)
        for batch in pipeline:
            yield batch.image[np.asarray(batch.mask, bool)]

    return batches
