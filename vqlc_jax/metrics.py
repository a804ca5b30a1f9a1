"""Reconstruction metrics (PSNR, PSNR-Y, SSIM, LPIPS, rFID statistics, codebook utilization) and generation metrics
(Inception Score, k-NN precision and recall).

Conventions (images NHWC, one value per image, [B]):
- `psnr`, `psnr_y`, `ssim` take RGB in [0, 1]. `psnr_y` is PSNR on the BT.601 luma (BasicSR's `test_y_channel`,
  the paper's PSNR); the paper's numbers were computed on 8-bit images, so quantise first to reproduce them.
- `ssim` follows skimage `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=-1)`, as do dm-pix, torchmetrics and piq at <= 256 px (the paper's): 11-tap Gaussian
  window (sigma 1.5, truncated at 3.5 sigma), k1 = 0.01, k2 = 0.03, population (co)variances, the SSIM map averaged
  over the "valid" positions only (skimage filters with reflect padding and then crops (11 - 1) / 2 = 5 pixels
  per border; the cropped map is exactly the valid correlation used here), per channel, then averaged over channels.
- `lpips_distance` takes images in [-1, 1] (our convention; the VGG16 lpips v0.1 of `models.lpips`).
- rFID: pool3 features of `models.inception.InceptionV3` (images in [0, 1]) accumulated on the host in float64
  (`FeatureStats`), compared with `frechet_distance`. The paper used clean-fid (PIL bicubic resize to 299), ours
  resizes bilinearly as pytorch-fid, so absolute numbers differ slightly from theirs.
- `inception_score` and `precision_recall` take Inception logits and pool features as ADM's evaluator does (their
  docstrings), host-side numpy, memory bounded.
- Metrics needing pretrained weights load them with `load_lpips_model` / `load_fid_model`, which return
  `Unavailable(metric, reason)` instead of a model when no weights file is at hand: never random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.models.inception import InceptionV3
from vqlc_jax.models.lpips import LPIPS
from vqlc_jax.quantizers.utilization import code_counts, perplexity, utilization

__all__ = [
    "FeatureStats", "ReferenceStats", "Unavailable", "code_counts", "frechet_distance", "inception_score",
    "load_fid_model", "load_lpips_model", "load_reference_stats", "lpips_distance", "perplexity", "precision_recall",
    "psnr", "psnr_y", "rgb_to_y", "save_reference_stats", "ssim", "utilization",
]

# ITU-R BT.601 luma for RGB in [0, 1], output in [0, 1] (16..235 on the 8-bit scale), as BasicSR's rgb2ycbcr.
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], np.float32) / 255.0
_Y_OFFSET = 16.0 / 255.0

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _per_image_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


@jax.jit
def psnr(a: jax.Array, b: jax.Array, *, data_range: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB of [B, H, W, C] images: 10 log10(data_range^2 / MSE); inf for identical images."""
    mse = _per_image_mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)
    return 10.0 * jnp.log10(data_range**2 / mse)


def rgb_to_y(images: jax.Array) -> jax.Array:
    """[..., 3] RGB in [0, 1] -> [..., 1] BT.601 luma Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255."""
    return (images.astype(jnp.float32) @ _Y_WEIGHTS + _Y_OFFSET)[..., None]


@jax.jit
def psnr_y(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image PSNR on the Y channel (`rgb_to_y`) of RGB images in [0, 1], data range 1 (= 255 on 8 bits);
    no border crop."""
    return psnr(rgb_to_y(a), rgb_to_y(b))


@functools.cache
def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian taps of scipy's `gaussian_filter` (radius = int(3.5 sigma + 0.5) = 5)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, w: np.ndarray) -> jax.Array:
    """Separable 'valid' correlation of [..., H, W, C] with the 1-D taps `w` along H and W."""
    n = len(w)
    h = x.shape[-3] - n + 1
    x = sum(float(w[i]) * x[..., i:i + h, :, :] for i in range(n))
    width = x.shape[-2] - n + 1
    return sum(float(w[i]) * x[..., :, i:i + width, :] for i in range(n))


@jax.jit
def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image SSIM of [B, H, W, C] images in [0, 1] (H, W >= 11), skimage's Gaussian convention (module doc)."""
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape}")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    # Moments of images shifted by their per-channel means: the (co)variances are shift-invariant and avoid the
    # float32 cancellation of E[x^2] - E[x]^2.
    shift = jnp.mean(a, axis=(1, 2), keepdims=True)
    a0, b0 = a - shift, b - shift
    mu_a0, mu_b0, aa, bb, ab = _filter_valid(jnp.stack([a0, b0, a0 * a0, b0 * b0, a0 * b0]), _gaussian_window())
    var_a, var_b, cov = aa - mu_a0**2, bb - mu_b0**2, ab - mu_a0 * mu_b0
    mu_a, mu_b = mu_a0 + shift, mu_b0 + shift
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return _per_image_mean(ssim_map)


@functools.partial(jax.jit, static_argnames="release_inputs")
def lpips_distance(variables: Mapping, a: jax.Array, b: jax.Array, *, release_inputs: bool = False) -> jax.Array:
    """Per-image LPIPS (VGG16, lpips v0.1) between [B, H, W, 3] images in [-1, 1].

    The VQGAN-LC release evaluated pyiqa's LPIPS (AlexNet), whose `normalize=True` default maps [0, 1] inputs to
    [-1, 1], on images already in [-1, 1], so the network saw 2x - 1 in [-3, 1]. `release_inputs=True` repeats that
    input mapping (only the mapping: the network here is VGG16, not AlexNet), for comparison with their numbers.
    """
    if release_inputs:
        a, b = 2.0 * a - 1.0, 2.0 * b - 1.0
    return LPIPS().apply(variables, a, b)


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """A metric that cannot be computed here, with the reason (e.g. its pretrained weights are not on disk)."""

    metric: str
    reason: str

    def __str__(self) -> str:
        return f"{self.metric} unavailable: {self.reason}"


def _load_model(
    metric: str,
    path: str | os.PathLike | None,
    model: nn.Module,
    from_npz: Callable[[str | os.PathLike], dict],
    from_torch: Callable[[str | os.PathLike], dict],
    how: str,
) -> tuple[nn.Module, dict] | Unavailable:
    """(model, variables) from a converted `.npz` or a torch file; Unavailable if `path` is None or absent.
    A file that exists but does not fit the model raises (CheckpointMismatchError naming file and keys)."""
    if path is None:
        return Unavailable(metric, f"no weights file given ({how})")
    if not os.path.isfile(path):
        return Unavailable(metric, f"weights file not found: {path} ({how})")
    load = from_npz if os.fspath(path).endswith(".npz") else from_torch
    return model, load(path)


def load_lpips_model(weights_path: str | os.PathLike | None) -> tuple[LPIPS, dict] | Unavailable:
    """LPIPS from converted variables (`.npz`) or an official VQGAN-LC checkpoint holding `perceptual_loss.*`."""
    from vqlc_jax.convert import lpips_weights

    how = "convert the VGG16 + lpips heads with convert.lpips_weights and save them as .npz"
    return _load_model("LPIPS", weights_path, LPIPS(), lpips_weights.load_lpips_variables,
                       lpips_weights.lpips_from_vqgan_lc_file, how)


def load_fid_model(weights_path: str | os.PathLike | None) -> tuple[InceptionV3, dict] | Unavailable:
    """FID InceptionV3 from converted variables (`.npz`) or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.

    The model gives pool features; the variables also hold the `fc` classifier that `InceptionV3(with_logits=True)`
    needs when the file has it (`convert.inception_weights.has_logits`)."""
    from vqlc_jax.convert import inception_weights

    how = f"pytorch-fid's {inception_weights.PYTORCH_FID_FILE} or its .npz conversion is needed"
    return _load_model("rFID", weights_path, InceptionV3(), inception_weights.load_inception_variables,
                       inception_weights.inception_from_pytorch_fid_file, how)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) in float64.

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    sigma1^(1/2) sigma2 sigma1^(1/2), which has the same spectrum: no non-symmetric `sqrtm`, no imaginary parts
    and no eps offset for singular products (pytorch-fid needs both); agrees with its scipy formula where that
    is well conditioned.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape} do not describe two Gaussians of one dimension")
    root = _sqrt_psd(sigma1)
    product = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    tr_covmean = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray | jax.Array, num_splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `num_splits` contiguous splits of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits [N, C])
    and p(y) its mean over the split, in float64.

    Split i holds rows [i N // s, (i + 1) N // s) (torch-fidelity's bounds, without its shuffle; ADM's evaluator
    takes 5,000-row chunks, the same splits at N = 50,000, and reports only the mean); std is the population std.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"inception_score: logits {logits.shape}, expected [N, C]")
    n = logits.shape[0]
    if not 1 <= num_splits <= n:
        raise ValueError(f"inception_score: num_splits={num_splits} must be in [1, N = {n}]")
    scores = []
    for i in range(num_splits):
        part = logits[i * n // num_splits:(i + 1) * n // num_splits].astype(np.float64)
        log_p = part - part.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        marginal = p.mean(axis=0)
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))  # a class with p(y) = 0 has p(y|x) = 0: no term
        kl = np.sum(p * (log_p - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """max(|a|^2 - 2 a.b + |b|^2, 0) for rows of `a` [n, d] against rows of `b` [m, d], float32 (ADM's form)."""
    a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    d = a @ b.T
    d *= -2.0
    d += np.einsum("ij,ij->i", a, a)[:, None]
    d += np.einsum("ij,ij->i", b, b)[None, :]
    return np.maximum(d, 0.0, out=d)


def _knn_radii(features: np.ndarray, k: int, block_rows: int) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row (the (k+1)-th smallest, itself at 0 included)."""
    radii = np.empty(len(features), np.float32)
    for start in range(0, len(features), block_rows):
        d = _squared_distances(features[start:start + block_rows], features)
        radii[start:start + block_rows] = np.partition(d, k, axis=1)[:, k]
    return radii


def precision_recall(real: np.ndarray | jax.Array, fake: np.ndarray | jax.Array, k: int = 3, *,
                     block_rows: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) of features `fake` [M, D] against `real` [N, D].

    As ADM's evaluator (its `ManifoldEstimator`, k = 3, no radius clamping): each set's manifold is the union of
    balls around its points with radius the distance to the k-th nearest neighbour in the set (itself excluded);
    precision = share of fake points inside the real manifold (distance <= radius of some real point), recall =
    share of real points inside the fake manifold. Squared Euclidean distances as |x|^2 - 2 x.y + |y|^2 in float32,
    `block_rows` rows at a time, so at most `block_rows` x max(N, M) distances exist at once. (ADM computes them in
    float16 whenever finite, so its values can differ from these in the last few samples.)
    """
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: real {real.shape} and fake {fake.shape} are not [N, D] and [M, D]")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"precision_recall: k={k} needs 1 <= k < the smaller set size "
                         f"(real {len(real)}, fake {len(fake)})")
    real_radii, fake_radii = _knn_radii(real, k, block_rows), _knn_radii(fake, k, block_rows)
    fake_in_real = np.zeros(len(fake), bool)
    real_in_fake = np.zeros(len(real), bool)
    for start in range(0, len(real), block_rows):
        d = _squared_distances(real[start:start + block_rows], fake)  # [b, M]
        fake_in_real |= np.any(d <= real_radii[start:start + block_rows, None], axis=0)
        real_in_fake[start:start + block_rows] = np.any(d <= fake_radii[None, :], axis=1)
    return float(fake_in_real.mean()), float(real_in_fake.mean())


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Gaussian statistics of a feature set: mean [d], covariance [d, d], sample count and a description."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    description: str = ""


@dataclasses.dataclass
class FeatureStats:
    """Streaming feature statistics in float64 on the host: count, sum [d] and sum of outer products [d, d]."""

    n: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def zeros(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def update(self, features: np.ndarray | jax.Array) -> None:
        """Adds a batch of features [B, d] (in place)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.total.shape[0]:
            raise ValueError(f"FeatureStats.update: features {f.shape}, expected [B, {self.total.shape[0]}]")
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of both feature sets (e.g. from several hosts)."""
        if other.total.shape != self.total.shape:
            raise ValueError(f"FeatureStats.merge: dimensions {self.total.shape[0]} and {other.total.shape[0]}")
        return FeatureStats(self.n + other.n, self.total + other.total, self.outer + other.outer)

    @property
    def mu(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("FeatureStats.mu: no features added")
        return self.total / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ((n - 1) normalisation, as np.cov / pytorch-fid)."""
        if self.n < 2:
            raise ValueError(f"FeatureStats.sigma: needs at least 2 features, has {self.n}")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def reference(self, description: str = "") -> ReferenceStats:
        return ReferenceStats(self.mu, self.sigma, self.n, description)


_REFERENCE_KEYS = ("mu", "sigma", "n", "description")


def save_reference_stats(stats: ReferenceStats, path: str | os.PathLike) -> None:
    """Writes `stats` to `path` (exactly that name) as an `.npz` with keys mu, sigma, n, description."""
    with open(path, "wb") as f:
        np.savez(f, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
                 n=np.int64(stats.n), description=np.str_(stats.description))


def load_reference_stats(path: str | os.PathLike) -> ReferenceStats:
    """Reads `save_reference_stats` output; errors name the file and the missing or mis-shaped key."""
    with np.load(path) as data:
        missing = [k for k in _REFERENCE_KEYS if k not in data.files]
        if missing:
            raise KeyError(f"{path}: reference statistics lack {', '.join(missing)} (has {', '.join(data.files)})")
        mu, sigma, n, description = (data[k] for k in _REFERENCE_KEYS)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [d] and [d, d]")
    return ReferenceStats(mu, sigma, int(n), str(description))
