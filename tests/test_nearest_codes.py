"""nearest_codes: agreement with brute force, bitwise chunk and method invariance (ties, ragged N), a million-code
search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc_jax.quantizers import nearest_codes


def _brute_force(z: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 argmin / min of the full squared-distance matrix."""
    d = ((z.astype(np.float64)[:, None, :] - codebook.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


def _assert_bitwise_equal(a: tuple, b: tuple) -> None:
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]).view(np.uint32), np.asarray(b[1]).view(np.uint32))


@pytest.mark.parametrize("method", ["reduce", "fold"])
def test_matches_brute_force(method):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 8)).astype(np.float32)
    codebook = rng.normal(size=(1000, 8)).astype(np.float32)
    idx, dist = nearest_codes(jnp.asarray(z), jnp.asarray(codebook), chunk_size=128, method=method)
    want_idx, want_dist = _brute_force(z, codebook)
    assert idx.dtype == jnp.int32 and dist.dtype == jnp.float32 and idx.shape == dist.shape == (300,)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(dist), want_dist, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_codes,dim", [(1037, 8), (1000, 3), (517, 16)])
def test_chunked_equals_unchunked_bitwise(num_codes, dim):
    rng = np.random.default_rng(num_codes)
    z = jnp.asarray(rng.normal(size=(257, dim)).astype(np.float32))
    codebook = jnp.asarray(rng.normal(size=(num_codes, dim)).astype(np.float32))
    whole = nearest_codes(z, codebook, chunk_size=None, method="reduce")
    for chunk_size in (1, 7, 64, 100, 128, num_codes - 1, num_codes, 4 * num_codes):
        _assert_bitwise_equal(nearest_codes(z, codebook, chunk_size=chunk_size, method="reduce"), whole)
    _assert_bitwise_equal(nearest_codes(z, codebook, method="fold"), whole)  # num_codes is not a multiple of 32
    _assert_bitwise_equal(nearest_codes(z, codebook), whole)  # auto


def test_ties_go_to_lowest_index_across_chunks():
    rng = np.random.default_rng(1)
    codebook = rng.normal(size=(53, 8)).astype(np.float32)  # 53 = 7 * 7 + 4: ragged last chunk
    duplicates = [5, 6, 12, 20, 50]  # copies inside chunk 0, across chunks 1 and 2, and in the ragged chunk
    codebook[duplicates] = codebook[5]
    z = np.concatenate([codebook[[5]] + 1e-3 * rng.normal(size=(40, 8)), codebook[[5]]]).astype(np.float32)
    whole = nearest_codes(jnp.asarray(z), jnp.asarray(codebook), chunk_size=None, method="reduce")
    np.testing.assert_array_equal(np.asarray(whole[0]), np.full(41, 5))
    np.testing.assert_array_equal(np.asarray(whole[0]), np.argmin(np.asarray(
        jnp.sum((jnp.asarray(z)[:, None] - jnp.asarray(codebook)[None]) ** 2, -1)), axis=1))
    assert float(whole[1][-1]) == 0.0
    for chunk_size in (1, 2, 6, 7, 13, 52):
        _assert_bitwise_equal(nearest_codes(jnp.asarray(z), jnp.asarray(codebook), chunk_size=chunk_size,
                                            method="reduce"), whole)
    _assert_bitwise_equal(nearest_codes(jnp.asarray(z), jnp.asarray(codebook), method="fold"), whole)


def test_sharded_batch_matches_unsharded():
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32))
    codebook = jnp.asarray(rng.normal(size=(300, 8)).astype(np.float32))
    z_sharded = jax.device_put(z, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    for method in ("reduce", "fold"):
        _assert_bitwise_equal(nearest_codes(z_sharded, codebook, chunk_size=64, method=method),
                              nearest_codes(z, codebook, chunk_size=64, method="reduce"))


def test_one_million_codes():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(512, 8)).astype(np.float32)
    codebook = rng.normal(size=(1_000_000, 8)).astype(np.float32)
    idx, dist = nearest_codes(jnp.asarray(z), jnp.asarray(codebook), chunk_size=16384)
    rows = np.arange(0, 512, 32)
    codebook64 = codebook.astype(np.float64)
    sq = np.stack([((codebook64 - z[r]) ** 2).sum(1) for r in rows])  # one row at a time: 8 MB each
    want_idx, want_dist = sq.argmin(1), sq.min(1)
    np.testing.assert_array_equal(np.asarray(idx)[rows], want_idx)
    np.testing.assert_allclose(np.asarray(dist)[rows], want_dist, rtol=1e-4, atol=1e-6)


def test_no_gradient_flows_through_the_search():
    z = jnp.ones((4, 8))
    codebook = jnp.arange(80.0).reshape(10, 8) / 80
    grad = jax.grad(lambda c: nearest_codes(z, c)[1].sum())(codebook)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


@pytest.mark.parametrize("z_shape,codebook_shape,chunk_size,method,message", [
    ((4, 8), (10, 4), None, "auto", "latent dim"),
    ((2, 4, 8), (10, 8), None, "auto", "expected z"),
    ((4, 8), (10, 8), 0, "auto", "chunk_size"),
    ((4, 8), (10, 8), None, "argmin", "unknown method 'argmin'"),
])
def test_bad_input(z_shape, codebook_shape, chunk_size, method, message):
    with pytest.raises(ValueError, match=message):
        nearest_codes(jnp.zeros(z_shape), jnp.zeros(codebook_shape), chunk_size=chunk_size, method=method)
