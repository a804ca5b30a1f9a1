"""`chunked_softmax_cross_entropy` against the plain full-logits loss (optax) and a float64 numpy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import relative_error
from jax.sharding import NamedSharding, PartitionSpec

from vqlc_jax import parallel
from vqlc_jax.losses import chunked_softmax_cross_entropy


def _inputs(tokens, dim, codes, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tokens, dim), np.float32), rng.standard_normal((dim, codes), np.float32) * 0.3,
            rng.standard_normal(codes, np.float32), rng.integers(0, codes, tokens).astype(np.int32))


def _plain(features, kernel, bias, targets, weights):
    logits = features @ kernel + bias
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(weights * per_token) / jnp.sum(weights)


def _numpy_loss(features, kernel, bias, targets, weights, eps):
    """float64 `(1 - eps) * nll + eps * mean_v(-log_softmax)`, weighted mean over tokens."""
    logits = features.astype(np.float64) @ kernel.astype(np.float64) + bias
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    per_token = -(1 - eps) * log_probs[np.arange(len(targets)), targets] - eps * log_probs.mean(axis=1)
    return float(np.sum(weights * per_token) / np.sum(weights))


@pytest.mark.parametrize("codes,chunk", [(1024, 256), (1000, 128), (300, 4096)], ids=["multiple", "rest", "one"])
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_matches_plain_loss_and_gradients(codes, chunk, weighted):
    features, kernel, bias, targets = _inputs(48, 16, codes)
    weights = (np.random.default_rng(1).random(48) < 0.7).astype(np.float32) if weighted else np.ones(48, np.float32)

    def chunked(f, k, b):
        return chunked_softmax_cross_entropy(f, k, targets, chunk_size=chunk, bias=b,
                                             weights=jnp.asarray(weights) if weighted else None)

    value, grads = jax.jit(jax.value_and_grad(chunked, (0, 1, 2)))(features, kernel, bias)
    want, want_grads = jax.jit(jax.value_and_grad(_plain, (0, 1, 2)))(features, kernel, bias, targets, weights)
    assert relative_error(value, want) < 1e-5
    for name, got, ref in zip(("features", "kernel", "bias"), grads, want_grads):
        assert relative_error(got, ref) < 1e-5, name


def test_without_bias_matches_plain():
    features, kernel, _, targets = _inputs(32, 8, 500)
    value, grads = jax.jit(jax.value_and_grad(
        lambda f, k: chunked_softmax_cross_entropy(f, k, targets, chunk_size=96), (0, 1)))(features, kernel)
    want, want_grads = jax.value_and_grad(
        lambda f, k: optax.softmax_cross_entropy_with_integer_labels(f @ k, targets).mean(), (0, 1))(features, kernel)
    assert relative_error(value, want) < 1e-5
    assert max(relative_error(g, w) for g, w in zip(grads, want_grads)) < 1e-5


def test_label_smoothing_matches_formula():
    features, kernel, bias, targets = _inputs(40, 16, 700)
    weights = np.random.default_rng(2).random(40).astype(np.float32)
    eps = 0.1

    def chunked(f, k, b):
        return chunked_softmax_cross_entropy(f, k, targets, chunk_size=128, bias=b, weights=jnp.asarray(weights),
                                             label_smoothing=eps)

    def smoothed(f, k, b):  # the same formula in plain jnp on full logits, for the gradients
        log_probs = jax.nn.log_softmax(f @ k + b)
        per_token = -(1 - eps) * jnp.take_along_axis(log_probs, targets[:, None], 1)[:, 0] - eps * log_probs.mean(1)
        return jnp.sum(weights * per_token) / jnp.sum(weights)

    value, grads = jax.jit(jax.value_and_grad(chunked, (0, 1, 2)))(features, kernel, bias)
    assert relative_error(value, _numpy_loss(features, kernel, bias, targets, weights, eps)) < 1e-5
    want_grads = jax.jit(jax.grad(smoothed, (0, 1, 2)))(features, kernel, bias)
    assert max(relative_error(g, w) for g, w in zip(grads, want_grads)) < 1e-5


def test_bf16_inputs_float32_loss():
    features, kernel, bias, targets = _inputs(64, 32, 1000)
    f16, k16 = jnp.asarray(features, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    value, (g_features, g_kernel) = jax.jit(jax.value_and_grad(
        lambda f, k: chunked_softmax_cross_entropy(f, k, targets, chunk_size=256, bias=bias), (0, 1)))(f16, k16)
    assert value.dtype == jnp.float32 and g_features.dtype == g_kernel.dtype == jnp.bfloat16
    ones = np.ones(64, np.float32)  # reference: the same bf16 values in float32
    want, want_grads = jax.value_and_grad(_plain, (0, 1))(
        f16.astype(jnp.float32), k16.astype(jnp.float32), bias, targets, ones)
    assert relative_error(value, want) < 1e-2
    assert relative_error(g_features, want_grads[0]) < 1e-2
    assert relative_error(g_kernel, want_grads[1]) < 1e-2


@pytest.mark.parametrize("mesh_kind", ["explicit", "auto"])
def test_jit_with_tokens_sharded(mesh_kind):
    """T split over 8 devices: an explicit mesh (jax.make_mesh's default, under jax.set_mesh) and the trainer's."""
    features, kernel, bias, targets = _inputs(64, 16, 1000)
    weights = np.random.default_rng(3).random(64).astype(np.float32)
    mesh = jax.make_mesh((8,), ("data",)) if mesh_kind == "explicit" else parallel.make_mesh()
    rows, full = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())

    def loss(f, k, b, t, w):
        return chunked_softmax_cross_entropy(f, k, t, chunk_size=128, bias=b, weights=w, label_smoothing=0.1)

    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, s) for x, s in
                zip((features, kernel, bias, targets, weights), (rows, full, full, rows, rows))]
        value, grads = step(*args)
    assert grads[0].sharding.is_equivalent_to(rows, 2)  # d features stay split over the tokens
    want, want_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(features, kernel, bias, targets, weights)
    assert relative_error(value, want) < 1e-5
    assert max(relative_error(g, w) for g, w in zip(grads, want_grads)) < 1e-5


def test_zero_weights_give_zero():
    features, kernel, bias, targets = _inputs(16, 8, 100)
    value, grads = jax.jit(jax.value_and_grad(lambda f: chunked_softmax_cross_entropy(
        f, kernel, targets, chunk_size=32, bias=bias, weights=jnp.zeros(16))))(features)
    assert float(value) == 0.0 and not np.any(np.asarray(grads))


def test_temp_memory_does_not_scale_with_logits():
    """value_and_grad compiled: the plain loss needs more temp memory than one f32 [T, V] array, the chunked one a
    small fraction of it."""
    tokens, dim, codes = 512, 32, 16384
    logits_bytes = tokens * codes * 4
    args = (jax.ShapeDtypeStruct((tokens, dim), jnp.float32), jax.ShapeDtypeStruct((dim, codes), jnp.float32),
            jax.ShapeDtypeStruct((tokens,), jnp.int32))

    def temp_bytes(loss):
        return jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda f, k, t: optax.softmax_cross_entropy_with_integer_labels(f @ k, t).mean())
    chunked = temp_bytes(lambda f, k, t: chunked_softmax_cross_entropy(f, k, t, chunk_size=512))
    assert plain > logits_bytes
    assert chunked < logits_bytes / 8, (chunked, logits_bytes)


@pytest.mark.parametrize("change,message", [
    (dict(features=np.zeros((4, 3), np.float32)), "features"),
    (dict(targets=np.zeros(5, np.int32)), "targets"),
    (dict(targets=np.zeros(4, np.float32)), "targets"),
    (dict(bias=np.zeros(7, np.float32)), "bias"),
    (dict(weights=np.ones(3, np.float32)), "weights"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(label_smoothing=1.0), "label_smoothing"),
])
def test_bad_input(change, message):
    kwargs = dict(features=np.zeros((4, 8), np.float32), kernel=np.zeros((8, 10), np.float32),
                  targets=np.zeros(4, np.int32), chunk_size=4)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        chunked_softmax_cross_entropy(**kwargs)
