"""k-means initialisations on a sample [m, D], in JAX: pure functions of a key, vmappable over independent problems.

- `random`: k distinct sample rows.
- `kmeans++`: greedy k-means++ as scikit-learn's (each new centre is the best of `local_trials` candidates drawn
  proportionally to weight x squared distance, default 2 + ln k); optional per-point weights.
- `kmeans||`: scalable k-means++ (Bahmani et al. 2012): one uniform point, then `rounds` rounds that each add
  ceil(oversampling x k) points drawn proportionally to squared distance, then weighted k-means++ on the candidates,
  each weighted by the sample points nearest to it. The paper draws each point independently (a random number of
  candidates per round); drawing a fixed number with replacement has the same expectation and static shapes (one
  compile, vmappable). Duplicate candidates get weight 0 and are never chosen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vqlc_jax.codebook.kmeans_search import nearest_centres

Array = jax.Array

INIT_METHODS = ("kmeans++", "kmeans||", "random")


def default_local_trials(k: int) -> int:
    """scikit-learn's number of greedy k-means++ trials."""
    return 2 + int(math.log(k))


def _weighted_choice(key: Array, weights: Array, num: int) -> Array:
    """`num` indices drawn with replacement with probability proportional to `weights` (>= 0, not all 0)."""
    cumulative = jnp.cumsum(weights)
    draws = jax.random.uniform(key, (num,)) * cumulative[-1]
    # side="right": the first index whose cumulative sum exceeds the draw, so a zero weight is never picked.
    return jnp.minimum(jnp.searchsorted(cumulative, draws, side="right"), weights.shape[0] - 1).astype(jnp.int32)


def _squared_distances(points: Array, x: Array, x_norms: Array) -> Array:
    """|p - x|^2 [L, m] of points [L, D] to x [m, D] by the expansion, clamped at 0 (cancellation)."""
    p_norms = jnp.sum(points * points, axis=1)
    return jnp.maximum(p_norms[:, None] + x_norms[None, :] - 2.0 * points @ x.T, 0.0)


def kmeans_plus_plus(key: Array, x: Array, k: int, *, weights: Array | None = None,
                     local_trials: int | None = None) -> Array:
    """Greedy k-means++ centres [k, D] chosen among the rows of x [m, D] (weighted by `weights` [m] if given)."""
    weights = jnp.ones(x.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
    trials = default_local_trials(k) if local_trials is None else local_trials
    x_norms = jnp.sum(x * x, axis=1)
    first_key, loop_key = jax.random.split(key)
    first = _weighted_choice(first_key, weights, 1)
    dist = _squared_distances(x[first], x, x_norms)[0]

    def add_centre(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        chosen, dist = carry
        candidates = _weighted_choice(jax.random.fold_in(loop_key, i), weights * dist, trials)
        new_dist = jnp.minimum(dist[None, :], _squared_distances(x[candidates], x, x_norms))  # [trials, m]
        best = jnp.argmin(new_dist @ weights)  # the candidate that leaves the smallest potential
        return chosen.at[i].set(candidates[best]), new_dist[best]

    chosen = jnp.zeros(k, jnp.int32).at[0].set(first[0])
    chosen, _ = jax.lax.fori_loop(1, k, add_centre, (chosen, dist))
    return x[chosen]


def kmeans_parallel(key: Array, x: Array, k: int, *, rounds: int = 5, oversampling: float = 2.0,
                    local_trials: int | None = None, chunk_size: int = 1024, row_chunk: int = 512) -> Array:
    """k-means|| centres [k, D] from the rows of x [m, D] (see the module docstring)."""
    per_round = math.ceil(oversampling * k)
    keys = jax.random.split(key, rounds + 2)
    candidates = [x[jax.random.randint(keys[0], (1,), 0, x.shape[0])]]
    dist = jnp.sum((x - candidates[0]) ** 2, axis=1)
    for r in range(rounds):
        new = x[_weighted_choice(keys[r + 1], dist, per_round)]
        dist = jnp.minimum(dist, nearest_centres(x, new, chunk_size=chunk_size, row_chunk=row_chunk)[1])
        candidates.append(new)
    candidates = jnp.concatenate(candidates)
    labels, _ = nearest_centres(x, candidates, chunk_size=chunk_size, row_chunk=row_chunk)
    weights = jnp.zeros(candidates.shape[0], jnp.float32).at[labels].add(1.0)
    return kmeans_plus_plus(keys[-1], candidates, k, weights=weights, local_trials=local_trials)


def random_rows(key: Array, x: Array, k: int) -> Array:
    """k distinct rows of x [m, D], uniformly."""
    return x[jax.random.choice(key, x.shape[0], (k,), replace=False)]


def init_centres(key: Array, x: Array, k: int, method: str, *, local_trials: int | None = None, rounds: int = 5,
                 oversampling: float = 2.0, chunk_size: int = 1024, row_chunk: int = 512) -> Array:
    """Initial centres [k, D] from the sample x [m, D] by `method` (one of INIT_METHODS)."""
    if method == "random":
        return random_rows(key, x, k)
    if method == "kmeans++":
        return kmeans_plus_plus(key, x, k, local_trials=local_trials)
    if method == "kmeans||":
        return kmeans_parallel(key, x, k, rounds=rounds, oversampling=oversampling, local_trials=local_trials,
                               chunk_size=chunk_size, row_chunk=row_chunk)
    raise ValueError(f"unknown k-means init {method!r}; choices: {', '.join(INIT_METHODS)}")
