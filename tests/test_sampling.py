"""Autoregressive sampling: the release's top-k filter, top-p and temperature against numpy, the cached sampler
against the release's re-run-everything loop and teacher-forced greedy decoding, CFG, and sharding."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vqlc_jax import parallel
from vqlc_jax.generators.sampling import (class_balanced_labels, filter_logits, kth_largest, sample_tokens,
                                          sample_tokens_no_cache, top_k_logits)
from vqlc_jax.models.gpt import GPT


def test_top_k_matches_release(fixtures_dir):
    with np.load(fixtures_dir / "official_generators" / "gpt_tiny.npz") as data:
        logits, want = data["topk_input"], data["topk_output"]
    got = np.asarray(top_k_logits(jnp.asarray(logits), 5))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_array_equal(got[np.isfinite(want)], want[np.isfinite(want)])


def test_kth_largest_is_exact():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 2000)) * 10 ** rng.uniform(-30, 30, (5, 2000))).astype(np.float32)
    x[1, :300] = -np.inf
    x[2, :40], x[2, 40:80] = -0.0, 0.0
    x[3, :] = np.float32(1.5)
    for k in (1, 7, 200, 1999, 2000):
        got = np.asarray(kth_largest(jnp.asarray(x), k))[:, 0]
        np.testing.assert_array_equal(got, -np.sort(-x, axis=-1)[:, k - 1])


def _numpy_filter(logits, top_k, top_p, temperature):
    """Straight from the definitions: temperature, keep values >= the k-th largest, then the smallest prefix of the
    sorted distribution whose mass reaches p (ties with its last value kept)."""
    logits = logits.astype(np.float64) / temperature
    out = logits.copy()
    for row in out:
        row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        ordered = np.sort(row)[::-1]
        probs = np.exp(ordered - ordered.max())
        probs /= probs.sum()
        last = min(np.searchsorted(np.cumsum(probs), top_p), len(row) - 1)
        row[row < ordered[last]] = -np.inf
    return out


def test_filters_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32) * 2
    logits[0, :4] = logits[0].max() + 1  # a tie at the top: all four kept by any k <= 4
    for top_k, top_p, temperature in ((3, 1.0, 1.0), (50, 0.5, 0.7), (10, 0.9, 1.5), (1, 0.3, 1.0)):
        got = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p, temperature=temperature))
        want = _numpy_filter(logits, top_k, top_p, temperature)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
    assert np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k=1)))[0].sum() == 4


@pytest.mark.parametrize("options, message", [
    (dict(top_k=0), "top_k=0"), (dict(top_k=51), "top_k=51"), (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"), (dict(temperature=0.0), "temperature=0.0")])
def test_filter_validation(options, message):
    with pytest.raises(ValueError, match=message):
        filter_logits(jnp.zeros((2, 50)), **options)


def test_class_balanced_labels():
    np.testing.assert_array_equal(class_balanced_labels(6, 3), [0, 0, 1, 1, 2, 2])
    shuffled = class_balanced_labels(100, 4, seed=1)
    assert shuffled.dtype == np.int32 and np.bincount(shuffled).tolist() == [25] * 4
    np.testing.assert_array_equal(shuffled, class_balanced_labels(100, 4, seed=1))
    assert not np.array_equal(shuffled, class_balanced_labels(100, 4))
    with pytest.raises(ValueError, match="num_samples=10"):
        class_balanced_labels(10, 4)


def _model(variant, null_class=True):
    model = GPT(num_codes=40, num_classes=5, block_size=17, num_layers=2, num_heads=2, width=32, variant=variant,
                null_class=null_class, multiple_of=32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return model, jax.tree.unflatten(tree, [x + jax.random.normal(k, x.shape) * 0.3 for x, k in zip(leaves, keys)])


LABELS = jnp.array([0, 3, 4, 1], jnp.int32)


@pytest.mark.parametrize("variant, options", [
    ("mingpt", dict(top_k=8, temperature=0.8)),
    ("llamagen", dict(top_p=0.7, cfg_scale=2.5, cfg_schedule="linear"))])
def test_cache_sampler_equals_release_loop(variant, options):
    model, variables = _model(variant)
    sample = jax.jit(partial(sample_tokens, model, num_tokens=16, **options))
    tokens = sample(variables, jax.random.key(7), LABELS)
    assert tokens.shape == (4, 16) and tokens.dtype == jnp.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < model.num_codes
    reference = jax.jit(partial(sample_tokens_no_cache, model, num_tokens=16, **options))
    np.testing.assert_array_equal(tokens, reference(variables, jax.random.key(7), LABELS))
    np.testing.assert_array_equal(tokens, sample(variables, jax.random.key(7), LABELS))  # deterministic
    assert not np.array_equal(tokens, sample(variables, jax.random.key(8), LABELS))


def _greedy_reference(model, variables, tokens, scales):
    """Teacher-forced full forward on [class, tokens]: argmax of the (guided) code logits at each position."""
    def code_logits(class_ids):
        idx = jnp.concatenate([class_ids[:, None], tokens[:, :-1]], 1)
        return model.apply(variables, idx)[..., : model.num_codes]
    cond = code_logits(model.num_codes + LABELS)
    if scales is None:
        return jnp.argmax(cond, -1)
    uncond = code_logits(jnp.full_like(LABELS, model.num_codes + model.num_classes))
    return jnp.argmax(uncond + scales[:, None] * (cond - uncond), -1)


@pytest.mark.parametrize("variant", ["mingpt", "llamagen"])
def test_greedy_and_cfg_against_teacher_forcing(variant):
    model, variables = _model(variant)
    greedy = sample_tokens(model, variables, jax.random.key(0), LABELS, num_tokens=16, top_k=1)
    np.testing.assert_array_equal(greedy, _greedy_reference(model, variables, greedy, None))
    guided = sample_tokens(model, variables, jax.random.key(0), LABELS, num_tokens=16, top_k=1, cfg_scale=3.0)
    np.testing.assert_array_equal(guided, _greedy_reference(model, variables, guided, jnp.full(16, 3.0)))
    assert not np.array_equal(guided, greedy)
    linear = sample_tokens(model, variables, jax.random.key(0), LABELS, num_tokens=16, top_k=1, cfg_scale=3.0,
                           cfg_schedule="linear")
    np.testing.assert_array_equal(linear, _greedy_reference(model, variables, linear, jnp.linspace(1.0, 3.0, 16)))


def test_cfg_scale_one_is_conditional_sampling():
    """The guided 2B batch at a scale next to 1 draws what plain conditional sampling draws."""
    model, variables = _model("mingpt")
    plain = sample_tokens(model, variables, jax.random.key(3), LABELS, num_tokens=16)
    near = sample_tokens(model, variables, jax.random.key(3), LABELS, num_tokens=16, cfg_scale=1.0 + 1e-6)
    np.testing.assert_array_equal(plain, near)


def test_sampler_validation():
    model, variables = _model("mingpt", null_class=False)
    call = partial(sample_tokens, model, variables, jax.random.key(0), LABELS)
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs a model with a null class"):
        call(num_tokens=16, cfg_scale=2.0)
    with pytest.raises(ValueError, match="top_k=41"):
        call(num_tokens=16, top_k=41)
    with pytest.raises(ValueError, match="num_tokens=17"):
        call(num_tokens=17)
    with pytest.raises(ValueError, match="cfg_schedule='cosine'"):
        call(num_tokens=16, cfg_schedule="cosine")


def test_sharded_equals_single_device():
    model, variables = _model("llamagen")
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    labels = jnp.arange(8, dtype=jnp.int32) % 5
    sample = jax.jit(partial(sample_tokens, model, num_tokens=16, top_k=20, cfg_scale=2.0))
    want = sample(variables, jax.random.key(4), labels)
    got = sample(jax.device_put(variables, NamedSharding(mesh, P())), jax.random.key(4),
                 jax.device_put(labels, NamedSharding(mesh, P(parallel.DATA))))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(got, want)
