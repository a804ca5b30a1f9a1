"""Metrics: PSNR / PSNR-Y / SSIM against skimage on real photos, LPIPS wrapper, Frechet distance against pytorch-fid's
scipy formula, streaming statistics, reference files and the unavailable-weights path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import skimage.color
import skimage.data
import skimage.filters
import skimage.metrics

from vqlc_jax import metrics
from vqlc_jax.convert.npz_variables import save_variables
from vqlc_jax.models.lpips import LPIPS
from vqlc_jax.quantizers.utilization import code_counts, perplexity, utilization


@pytest.fixture(scope="module")
def photo_pairs() -> tuple[np.ndarray, np.ndarray]:
    """[9, 64, 80, 3] crops of three skimage photos in [0, 1] and distorted versions: noise (sigma 0.02 and 0.2,
    clipped) and a Gaussian blur."""
    rng = np.random.default_rng(0)
    crops = [im[100:164, 120:200] / 255.0 for im in (skimage.data.astronaut(), skimage.data.chelsea(),
                                                     skimage.data.coffee())]
    clean, distorted = [], []
    for crop in crops:
        for noise in (0.02, 0.2):
            clean.append(crop)
            distorted.append(np.clip(crop + noise * rng.standard_normal(crop.shape), 0, 1))
        clean.append(crop)
        distorted.append(skimage.filters.gaussian(crop, sigma=1.0, channel_axis=-1))
    return np.stack(clean).astype(np.float32), np.stack(distorted).astype(np.float32)


def test_ssim_matches_skimage(photo_pairs):
    a, b = photo_pairs
    want = [skimage.metrics.structural_similarity(x.astype(np.float64), y.astype(np.float64), gaussian_weights=True,
                                                  sigma=1.5, use_sample_covariance=False, data_range=1,
                                                  channel_axis=-1) for x, y in zip(a, b)]
    got = np.asarray(metrics.ssim(a, b))
    assert got.shape == (len(a),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # measured <= 1e-7
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[:, :10], b[:, :10])


def test_psnr_and_psnr_y_match_skimage(photo_pairs):
    a, b = photo_pairs
    want = [skimage.metrics.peak_signal_noise_ratio(x.astype(np.float64), y.astype(np.float64), data_range=1)
            for x, y in zip(a, b)]
    np.testing.assert_allclose(metrics.psnr(a, b), want, rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(255 * a, 255 * b, data_range=255.0), want, rtol=1e-5)
    assert np.isinf(metrics.psnr(a, a)).all()

    def luma(x):  # skimage's BT.601 Y in [16, 235]
        return skimage.color.rgb2ycbcr(x.astype(np.float64))[..., 0] / 255.0

    want_y = [skimage.metrics.peak_signal_noise_ratio(luma(x), luma(y), data_range=1) for x, y in zip(a, b)]
    np.testing.assert_allclose(metrics.psnr_y(a, b), want_y, rtol=1e-5)
    np.testing.assert_allclose(metrics.rgb_to_y(jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))[:, 0],
                               [16 / 255, 235 / 255], atol=1e-6)


@pytest.fixture(scope="module")
def lpips_variables() -> dict:
    """Random LPIPS variables (|0.05 N(0, 1)|), only to test the wiring."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda s: np.abs(0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        jax.eval_shape(LPIPS().init, jax.random.key(0), x, x))


def test_lpips_distance_wraps_the_lpips_module(lpips_variables):
    x0, x1 = np.random.default_rng(4).uniform(-1, 1, (2, 2, 16, 16, 3)).astype(np.float32)
    got = metrics.lpips_distance(lpips_variables, x0, x1)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, jax.jit(LPIPS().apply)(lpips_variables, x0, x1), rtol=1e-6)
    np.testing.assert_allclose(metrics.lpips_distance(lpips_variables, x0, x1, release_inputs=True),
                               metrics.lpips_distance(lpips_variables, 2 * x0 - 1, 2 * x1 - 1), rtol=1e-6)


def test_lpips_loading_and_unavailable(tmp_path, lpips_variables):
    path = tmp_path / "lpips_vgg.npz"
    save_variables(lpips_variables, path)
    model, loaded = metrics.load_lpips_model(path)
    assert isinstance(model, LPIPS) and jax.tree.all(jax.tree.map(np.array_equal, loaded, lpips_variables))
    for missing in (None, tmp_path / "absent.npz"):
        result = metrics.load_lpips_model(missing)
        assert isinstance(result, metrics.Unavailable) and result.metric == "LPIPS"
        assert str(result).startswith("LPIPS unavailable: ")


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's `calculate_frechet_distance` (scipy sqrtm, eps offset on failure), float64."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    for dim, n in ((16, 200), (128, 1000)):
        f1 = rng.standard_normal((n, dim))
        f2 = 0.5 * rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + 0.3
        args = (f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
        want = _pytorch_fid_formula(*args)
        assert abs(metrics.frechet_distance(*args) - want) <= 1e-6 * abs(want)  # measured ~1e-15

    # Rank-deficient covariances (n < d): finite without an eps offset; identical statistics give ~0.
    f = rng.standard_normal((20, 64))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * np.trace(sigma)
    with pytest.raises(ValueError, match="shapes"):
        metrics.frechet_distance(mu, sigma, mu[:-1], sigma)


def test_feature_stats_stream_and_merge():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((300, 24)).astype(np.float32) + 2.0
    first, second = metrics.FeatureStats.zeros(24), metrics.FeatureStats.zeros(24)
    for chunk in np.array_split(features[:170], 3):
        first.update(chunk)
    second.update(jnp.asarray(features[170:]))
    stats = first.merge(second)
    assert stats.n == 300
    np.testing.assert_allclose(stats.mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(ValueError, match=r"expected \[B, 24\]"):
        stats.update(features[:, :8])
    with pytest.raises(ValueError, match="at least 2"):
        metrics.FeatureStats.zeros(24).sigma


def test_reference_stats_round_trip_and_errors(tmp_path):
    stats = metrics.FeatureStats.zeros(8)
    stats.update(np.random.default_rng(2).standard_normal((50, 8)))
    ref = stats.reference("val 256px, 50 images")
    path = tmp_path / "ref.npz"
    metrics.save_reference_stats(ref, path)
    loaded = metrics.load_reference_stats(path)
    assert (loaded.n, loaded.description) == (50, "val 256px, 50 images")
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)

    np.savez(tmp_path / "no_n.npz", mu=ref.mu, sigma=ref.sigma, description="x")
    with pytest.raises(KeyError, match=r"no_n\.npz.*lack n"):
        metrics.load_reference_stats(tmp_path / "no_n.npz")
    np.savez(tmp_path / "shape.npz", mu=ref.mu, sigma=ref.sigma[:4], n=50, description="x")
    with pytest.raises(ValueError, match=r"shape\.npz.*\(4, 8\)"):
        metrics.load_reference_stats(tmp_path / "shape.npz")


def test_utilization_helpers_are_reexported():
    assert (metrics.code_counts, metrics.utilization, metrics.perplexity) == (code_counts, utilization, perplexity)
