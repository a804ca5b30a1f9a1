"""Training losses as pure functions of arrays (no state, jittable)."""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from vqlc_jax.sharded_ops import iota_like, replicate

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


def codebook_entropy_loss(affinity: Array, *, temperature: float = 0.01) -> Array:
    """sample entropy - average entropy of p = softmax(affinity / temperature) over the codes (rows: tokens).

    The LlamaGen / FQGAN entropy penalty (its weight, 0.03 there, is the caller's): low when each token is sure of
    its code and the batch spreads over many codes. affinity [..., N] is -squared distance; the whole [T, N] matrix
    is materialised. sample = -mean_rows(sum(p log p)), average = -sum(pbar log(pbar + 1e-5)), pbar = mean_rows(p).
    """
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    return sample_entropy - avg_entropy


def _unit(x: Array) -> Array:
    """x / max(|x|, 1e-12) along the last axis (torch's F.normalize)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def disentanglement_loss(codes: Sequence[Array]) -> Array:
    """FQGAN's disentanglement: mean over positions of the squared cosine between two sub-codes [..., D]; with more
    than two, the mean over all pairs (Triple). Unweighted (the release uses 0.1)."""
    if len(codes) < 2:
        raise ValueError(f"disentanglement_loss: needs at least two sub-codes, got {len(codes)}")
    pairs = list(itertools.combinations([_unit(c) for c in codes], 2))
    return sum(jnp.mean(jnp.square(jnp.sum(a * b, axis=-1))) for a, b in pairs) / len(pairs)


def info_nce_loss(student: Array, teacher: Array, *, temperature: float = 1.0) -> Array:
    """InfoNCE over the batch between student [B, W] and teacher [B, W] features (FQGAN's semantic loss, e.g. the
    FeatPredHead's CLS output against the CLIP CLS): both l2-normalised, logits = s @ t.T / temperature, targets
    the diagonal. The teacher's path is cut (stop_gradient): gradients reach the student only."""
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"info_nce_loss: expected student and teacher [B, W] of one shape, got {student.shape} and "
                         f"{teacher.shape}")
    logits = jnp.dot(_unit(student), _unit(jax.lax.stop_gradient(teacher)).T,
                     precision=jax.lax.Precision.HIGHEST) / temperature
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))


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


def chunked_softmax_cross_entropy(features: Array, kernel: Array, targets: Array, *, chunk_size: int,
                                  bias: Array | None = None, weights: Array | None = None,
                                  label_smoothing: float = 0.0) -> Array:
    """Mean cross-entropy of the logits `features @ kernel (+ bias)` against `targets`, never materialising the
    [T, V] logits: a scan over vocabulary chunks of `chunk_size` codes, at most a few [T, chunk_size] float32
    arrays alive at a time, forward (online logsumexp) and backward (each chunk's softmax recomputed).

    Args:
      features: [T, D] (float32 or bf16; T may be sharded over a data axis).
      kernel: [D, V] head weights; bias: optional [V].
      targets: int [T] in [0, V) (an out-of-range target contributes a zero target logit, as a one-hot would).
      chunk_size: codes per chunk (V need not be a multiple of it).
      weights: optional [T]: the mean is weighted by them (e.g. a 0/1 mask); 0 when they sum to 0.
      label_smoothing: eps of the release's LabelSmoothing, `(1 - eps) * nll + eps * mean_v(-log_softmax)`.

    Returns:
      float32 scalar, differentiable in features, kernel, bias and weights (logsumexp in float32).
    """
    if features.ndim != 2 or kernel.ndim != 2 or features.shape[1] != kernel.shape[0]:
        raise ValueError(f"chunked_softmax_cross_entropy: expected features [T, D] and kernel [D, V], got "
                         f"{features.shape} and {kernel.shape}")
    num_tokens, num_codes = features.shape[0], kernel.shape[1]
    if targets.shape != (num_tokens,) or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"chunked_softmax_cross_entropy: targets must be int [{num_tokens}], got "
                         f"{targets.dtype} {targets.shape}")
    if bias is not None and bias.shape != (num_codes,):
        raise ValueError(f"chunked_softmax_cross_entropy: bias must be [{num_codes}], got {bias.shape}")
    if weights is not None and weights.shape != (num_tokens,):
        raise ValueError(f"chunked_softmax_cross_entropy: weights must be [{num_tokens}], got {weights.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_softmax_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"chunked_softmax_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    per_token = _token_cross_entropy(min(chunk_size, num_codes), float(label_smoothing), features, replicate(kernel),
                                     None if bias is None else replicate(bias), targets)
    if weights is None:
        return jnp.mean(per_token)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    return jnp.sum(weights * per_token) / jnp.where(total != 0, total, 1.0)


def _over_chunks(body, carry, num_codes: int, chunk_size: int):
    """Folds body(carry, start, size) over the vocabulary: a loop over the full chunks, then the remainder."""
    full, rest = divmod(num_codes, chunk_size)
    carry = jax.lax.fori_loop(0, full, lambda i, c: body(c, i * chunk_size, chunk_size), carry)
    return body(carry, full * chunk_size, rest) if rest else carry


def _chunk_logits(features: Array, kernel: Array, bias: Array | None, targets: Array, start, size: int):
    """(float32 logits [T, size] of codes [start, start + size), their kernel columns, target mask [T, size])."""
    columns = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1)
    logits = jnp.dot(features, columns, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + jax.lax.dynamic_slice_in_dim(bias, start, size).astype(jnp.float32)
    is_target = iota_like(logits, 1) + start == targets[:, None]
    return logits, columns, is_target


def _token_cross_entropy_fwd(chunk_size, eps, features, kernel, bias, targets):
    num_codes = kernel.shape[1]

    def body(carry, start, size):
        running_max, running_sum, target_logit, logit_sum = carry
        logits, _, is_target = _chunk_logits(features, kernel, bias, targets, start, size)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1))
        target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
        if eps:
            logit_sum = logit_sum + jnp.sum(logits, axis=1)
        return new_max, running_sum, target_logit, logit_sum

    zeros = jnp.zeros_like(features[:, 0], jnp.float32)  # [T], sharded like the tokens
    running_max, running_sum, target_logit, logit_sum = _over_chunks(
        body, (zeros - jnp.inf, zeros, zeros, zeros), num_codes, chunk_size)
    lse = running_max + jnp.log(running_sum)
    loss = lse - (1.0 - eps) * target_logit - eps * logit_sum / num_codes
    return loss, (features, kernel, bias, targets, lse)


def _token_cross_entropy_bwd(chunk_size, eps, residuals, grad):
    features, kernel, bias, targets, lse = residuals
    num_codes = kernel.shape[1]
    compute_dtype = jnp.result_type(features, kernel)
    token_mesh = jax.typeof(features).sharding.mesh  # d kernel sums over the tokens: replicated on an explicit mesh
    column_sharding = NamedSharding(token_mesh, PartitionSpec()) if token_mesh.explicit_axes else None

    def body(carry, start, size):
        d_features, d_kernel, d_bias = carry
        logits, columns, is_target = _chunk_logits(features, kernel, bias, targets, start, size)
        d_logits = grad[:, None] * (jnp.exp(logits - lse[:, None]) - (1.0 - eps) * is_target - eps / num_codes)
        d_logits_c = d_logits.astype(compute_dtype)
        d_features = d_features + jnp.dot(d_logits_c, columns.T, preferred_element_type=jnp.float32)
        d_columns = jnp.dot(features.T, d_logits_c, preferred_element_type=jnp.float32,
                            out_sharding=column_sharding)
        d_kernel = jax.lax.dynamic_update_slice_in_dim(d_kernel, d_columns.astype(kernel.dtype), start, axis=1)
        if bias is not None:
            d_bias = jax.lax.dynamic_update_slice_in_dim(d_bias, jnp.sum(d_logits, axis=0).astype(bias.dtype),
                                                         start, axis=0)
        return d_features, d_kernel, d_bias

    init = (jnp.zeros_like(features, jnp.float32), jnp.zeros_like(kernel),
            None if bias is None else jnp.zeros_like(bias))
    d_features, d_kernel, d_bias = _over_chunks(body, init, num_codes, chunk_size)
    return d_features.astype(features.dtype), d_kernel, d_bias, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _token_cross_entropy(chunk_size: int, eps: float, features: Array, kernel: Array, bias: Array | None,
                         targets: Array) -> Array:
    """Per-token float32 [T] `(1 - eps) * (lse - z_y) + eps * (lse - mean_v z)`, chunked (see the public function)."""
    return _token_cross_entropy_fwd(chunk_size, eps, features, kernel, bias, targets)[0]


_token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)
