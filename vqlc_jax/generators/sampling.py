"""Autoregressive sampling of token maps from a class-conditional `GPT`: pure functions, one compiled loop.

`sample_tokens` decodes with a KV cache (one position per step); `sample_tokens_no_cache` re-runs the whole
(fixed-length, causally masked) sequence every step as the release does. Both draw step i with
`fold_in(rng, i)`, so they give the same tokens. Logits are restricted to the N image codes (class ids are never
sampled); classifier-free guidance runs the conditional and the null-class rows in one batch of 2B:
`logits = u + s (c - u)`, then temperature, top-k and top-p.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
CFG_SCHEDULES = ("constant", "linear")


def kth_largest(x: Array, k: int) -> Array:
    """The k-th largest value along the last axis, [..., 1], exactly (ties counted), for float32 `x`.

    A 32-step bisection over the order-preserving uint32 keys of the floats: each step counts the entries at or
    above a key, so the cost is 32 passes over `x` whatever k is (`lax.top_k` with k in the thousands, as the
    paper's k = 10% of N, is ~10x slower on CPU).
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))  # float order == uint order

    def halve(_, bounds):  # invariant: count(keys >= lo) >= k and the answer lies in [lo, hi]
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        enough = jnp.sum(keys >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    start = (jnp.zeros((*x.shape[:-1], 1), jnp.uint32), jnp.full((*x.shape[:-1], 1), 0xFFFFFFFF, jnp.uint32))
    lo = jax.lax.fori_loop(0, 32, halve, start)[0]
    bits = jnp.where(lo >> 31 == 1, lo & jnp.uint32(0x7FFFFFFF), ~lo)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(x.dtype)


def top_k_logits(logits: Array, k: int) -> Array:
    """The release's filter: entries strictly below the k-th largest value of the last axis become -inf (ties with
    it are kept)."""
    return jnp.where(logits < kth_largest(logits, k), -jnp.inf, logits)


def top_p_logits(logits: Array, p: float) -> Array:
    """Nucleus filter: keeps the smallest set of largest logits whose probability mass reaches `p` (at least one,
    ties with the last kept value included); the rest become -inf."""
    ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, num_kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def check_filters(num_logits: int, top_k: int | None, top_p: float | None, temperature: float) -> None:
    if top_k is not None and not 0 < top_k <= num_logits:
        raise ValueError(f"top_k={top_k} must lie in [1, {num_logits}] (the number of codes)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")


def filter_logits(logits: Array, *, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0) -> Array:
    """`logits / temperature`, then top-k, then top-p (None: off). Bad values raise before tracing."""
    check_filters(logits.shape[-1], top_k, top_p, temperature)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    return logits


def class_balanced_labels(num_samples: int, num_classes: int, seed: int | None = None) -> np.ndarray:
    """int32 [num_samples]: each class num_samples / num_classes times (0, 0, ..., 1, 1, ...), shuffled when
    `seed` is given (the papers' 50 samples per class)."""
    if num_classes < 1 or num_samples % num_classes:
        raise ValueError(f"num_samples={num_samples} is not a multiple of num_classes={num_classes}")
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), num_samples // num_classes)
    return labels if seed is None else np.random.default_rng(seed).permutation(labels)


def check_request(labels: Any, num_tokens: int, block_size: int, cfg_schedule: str) -> None:
    """Labels a vector, 1 <= num_tokens < block_size, a known CFG schedule; raises naming the value."""
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be a vector [B], got shape {np.shape(labels)}")
    if not 0 < num_tokens < block_size:
        raise ValueError(f"num_tokens={num_tokens} must lie in [1, {block_size - 1}] (block_size - 1)")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r}: choices: {', '.join(CFG_SCHEDULES)}")


def cfg_scale_at(step: Any, cfg_scale: float, cfg_schedule: str, num_tokens: int) -> Any:
    """The guidance scale at token `step`: constant, or linear from 1 at the first token to `cfg_scale` at the
    last."""
    if cfg_schedule == "constant" or num_tokens == 1:
        return cfg_scale
    return 1.0 + (cfg_scale - 1.0) * step / (num_tokens - 1)


def guide(logits: Array, scale: Any) -> Array:
    """Classifier-free guidance of rows [conditional; null]: `u + scale (c - u)`, [rows / 2, V]."""
    cond, uncond = jnp.split(logits, 2)
    return uncond + scale * (cond - uncond)


def _sampler(model: Any, labels: Array, *, num_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, cfg_scale: float, cfg_schedule: str) -> tuple[Array, Callable]:
    """Validates the request; returns the class ids of the batch (2B rows under CFG: conditional, then null) and
    `draw(rng, step, logits [rows, V_out]) -> tokens [B]`."""
    check_request(labels, num_tokens, model.block_size, cfg_schedule)
    check_filters(model.num_codes, top_k, top_p, temperature)
    guided = cfg_scale != 1.0
    if guided and not model.null_class:
        raise ValueError(f"cfg_scale={cfg_scale} needs a model with a null class (GPT null_class=True, trained with "
                         "label dropout); use cfg_scale=1.0 for this one")
    class_ids = model.num_codes + jnp.asarray(labels, jnp.int32)
    if guided:
        null = jnp.full_like(class_ids, model.num_codes + model.num_classes)
        class_ids = jnp.concatenate([class_ids, null])

    def draw(rng, step, logits):
        logits = logits[:, : model.num_codes].astype(jnp.float32)
        if guided:
            logits = guide(logits, cfg_scale_at(step, cfg_scale, cfg_schedule, num_tokens))
        logits = filter_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature)
        return jax.random.categorical(jax.random.fold_in(rng, step), logits).astype(jnp.int32)

    return class_ids, draw


def sample_tokens(model: Any, variables: Any, rng: Array, labels: Array, *, num_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  cfg_scale: float = 1.0, cfg_schedule: str = "constant") -> Array:
    """Token sequences int32 [B, num_tokens] for class `labels` [B], decoded with a KV cache in one `fori_loop`.

    `cfg_schedule`: "constant" (scale `cfg_scale` throughout) or "linear" (from 1 at the first token to `cfg_scale`
    at the last). Jit it whole with the labels sharded over the batch: `jax.jit(partial(sample_tokens, model, ...))`.
    """
    class_ids, draw = _sampler(model, labels, num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)
    rows = class_ids.shape[0]
    num_labels = np.shape(labels)[0]

    def step(i, carry):
        cache, tokens = carry
        previous = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)
        ids = jnp.where(i == 0, class_ids, jnp.tile(previous, rows // num_labels))
        logits, cache = model.apply(variables, ids, i, cache, method="decode_step")
        return cache, jax.lax.dynamic_update_index_in_dim(tokens, draw(rng, i, logits), i, axis=1)

    tokens = jnp.zeros((num_labels, num_tokens), jnp.int32)
    return jax.lax.fori_loop(0, num_tokens, step, (model.init_cache(rows), tokens))[1]


def sample_tokens_no_cache(model: Any, variables: Any, rng: Array, labels: Array, *, num_tokens: int,
                           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                           cfg_scale: float = 1.0, cfg_schedule: str = "constant") -> Array:
    """`sample_tokens` the release's way: every step re-runs the full forward over a fixed-length sequence
    `[class, tokens so far, padding]` (causal, so the padding is never seen) and reads the logits at step i.
    Same arguments, same random draws, so the same tokens; one compiled `fori_loop`."""
    class_ids, draw = _sampler(model, labels, num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)
    rows = class_ids.shape[0]
    num_labels = np.shape(labels)[0]

    def step(i, seq):
        logits = jax.lax.dynamic_index_in_dim(model.apply(variables, seq[:, :-1]), i, axis=1, keepdims=False)
        token = jnp.tile(draw(rng, i, logits), rows // num_labels)
        return jax.lax.dynamic_update_index_in_dim(seq, token, i + 1, axis=1)

    seq = jnp.zeros((rows, num_tokens + 1), jnp.int32).at[:, 0].set(class_ids)
    return jax.lax.fori_loop(0, num_tokens, step, seq)[:num_labels, 1:]
