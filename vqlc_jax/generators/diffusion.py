"""Gaussian diffusion as DiT's (`diffusion/` of facebookresearch/DiT = the release's `dit-lc/diffusion/`) and LDM's
(`ldm/models/diffusion/ddpm.py`, `ddim.py`): schedules, the forward process, losses and samplers, all pure.

A `GaussianDiffusion` holds a float64 numpy schedule; every derived array is computed in float64 and cast to float32
when indexed, as the releases do. A respaced process (`space_timesteps`, `respace`) keeps the original-scale
timestep of each of its steps in `timestep_map`: a model is always called with `timestep_map[t]`. Models are plain
functions `model_fn(x, t) -> output` on NHWC arrays (eps prediction; with the learned-range variance the output has
2C channels: eps, then the variance values in [-1, 1]). Samplers are one `lax.scan` each (jit the caller) and take
either a PRNG key or the pre-drawn noises [steps, ...] (parity with the releases).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
SCHEDULES = ("dit", "ldm")


def dit_betas(num_steps: int = 1000) -> np.ndarray:
    """DiT's (IDDPM's) "linear" betas: `linspace(1e-4 s, 0.02 s, T)`, s = 1000 / T, float64."""
    _check_steps(num_steps)
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def ldm_betas(num_steps: int = 1000, start: float = 0.0015, end: float = 0.0195) -> np.ndarray:
    """LDM's "linear" betas: linear in sqrt(beta), `linspace(sqrt(start), sqrt(end), T) ** 2`, float64."""
    _check_steps(num_steps)
    return np.linspace(start ** 0.5, end ** 0.5, num_steps, dtype=np.float64) ** 2


def _check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps <= 0:
        raise ValueError(f"number of diffusion steps must be a positive integer, got {num_steps!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A discrete Gaussian diffusion: `betas` [T] (float64), the original-scale timestep of each step
    (`timestep_map`, identity unless respaced) and the reverse-process variance: "learned_range" (the model's
    second half of channels interpolates log beta_t and the clipped posterior log variance), "fixed_small"
    (posterior variance) or "fixed_large" (beta_t, with the posterior variance at t = 0). The clipped posterior log
    variance is IDDPM's (t = 0 takes the t = 1 value; LDM's `log(max(v, 1e-20))` differs only there, and neither its
    loss nor its DDIM reads it)."""

    betas: np.ndarray
    timestep_map: np.ndarray
    var_type: str = "learned_range"

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        if betas.ndim != 1 or betas.size < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a vector of at least 2 values in (0, 1], got shape {betas.shape}")
        steps = np.asarray(self.timestep_map, np.int64)
        if steps.shape != betas.shape:
            raise ValueError(f"timestep_map of shape {steps.shape} does not match betas {betas.shape}")
        if self.var_type not in VAR_TYPES:
            raise ValueError(f"var_type={self.var_type!r}: choices: {', '.join(VAR_TYPES)}")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timestep_map", steps)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def posterior_variance(self) -> np.ndarray:
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log of the posterior variance with its t = 0 entry (0) replaced by the t = 1 one (IDDPM/DiT)."""
        variance = self.posterior_variance
        return np.log(np.append(variance[1], variance[1:]))

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)


def create_diffusion(schedule: str = "dit", num_steps: int = 1000, respacing: str | list[int] = "",
                     var_type: str = "learned_range") -> GaussianDiffusion:
    """DiT's `create_diffusion(respacing)` (schedule "dit", learned-range variance) or LDM's DDPM (schedule "ldm",
    use var_type "fixed_small" without a learned variance); respacing "" keeps every step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"diffusion schedule {schedule!r}: choices: {', '.join(SCHEDULES)}")
    betas = dit_betas(num_steps) if schedule == "dit" else ldm_betas(num_steps)
    base = GaussianDiffusion(betas, np.arange(num_steps), var_type)
    if respacing in ("", None):
        return base
    return respace(base, space_timesteps(num_steps, respacing))


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> np.ndarray:
    """IDDPM's `space_timesteps`, sorted: the kept steps of `num_timesteps`, `section_counts` steps evenly strided
    (rounded) over each of equal sections ("25", "10,15,20" or a list), or "ddimN" for DDIM's integer stride."""
    _check_steps(num_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = section_counts[len("ddim"):]
            desired = int(desired) if desired.isdigit() else -1
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return np.arange(0, num_timesteps, stride)
            raise ValueError(f"timestep respacing {section_counts!r}: cannot take exactly that many of {num_timesteps} "
                             "steps with an integer stride")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep respacing {section_counts!r}: expected counts like '250' or '10,15,20', "
                             "or 'ddimN'") from None
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"timestep respacing: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # accumulated, not k * stride: the release's rounding
            steps.append(start + round(position))
            position += stride
        start += size
    return np.unique(steps)


def respace(base: GaussianDiffusion, use_timesteps) -> GaussianDiffusion:
    """The process on the kept steps (`SpacedDiffusion`): betas `1 - ab[i] / ab[previous kept]`, the original-scale
    timesteps in `timestep_map`."""
    keep = np.unique(np.asarray(use_timesteps, np.int64))
    if keep.size < 2 or keep[0] < 0 or keep[-1] >= base.num_timesteps:
        raise ValueError(f"respace: timesteps {keep.tolist()[:8]}... must be at least 2 of 0..{base.num_timesteps - 1}")
    ab = base.alphas_cumprod[keep]
    betas = 1.0 - ab / np.append(1.0, ab[:-1])
    return GaussianDiffusion(betas, base.timestep_map[keep], base.var_type)


def _extract(arr: np.ndarray, t: Array, ndim: int) -> Array:
    """arr[t] (float64 numpy -> float32) shaped [B, 1, ..., 1] to broadcast over x of `ndim` dims."""
    values = jnp.asarray(np.asarray(arr, np.float64).astype(np.float32))[t]
    return values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(d: GaussianDiffusion, x_start: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise."""
    ab = d.alphas_cumprod
    return _extract(np.sqrt(ab), t, x_start.ndim) * x_start + _extract(np.sqrt(1.0 - ab), t, x_start.ndim) * noise


def q_posterior_mean_variance(d: GaussianDiffusion, x_start: Array, x_t: Array, t: Array
                              ) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    n = x_t.ndim
    mean = _extract(d.posterior_mean_coef1, t, n) * x_start + _extract(d.posterior_mean_coef2, t, n) * x_t
    return mean, _extract(d.posterior_variance, t, n), _extract(d.posterior_log_variance_clipped, t, n)


def predict_xstart_from_eps(d: GaussianDiffusion, x_t: Array, t: Array, eps: Array) -> Array:
    ab = d.alphas_cumprod
    return _extract(np.sqrt(1.0 / ab), t, x_t.ndim) * x_t - _extract(np.sqrt(1.0 / ab - 1), t, x_t.ndim) * eps


def predict_eps_from_xstart(d: GaussianDiffusion, x_t: Array, t: Array, pred_xstart: Array) -> Array:
    ab = d.alphas_cumprod
    return ((_extract(np.sqrt(1.0 / ab), t, x_t.ndim) * x_t - pred_xstart)
            / _extract(np.sqrt(1.0 / ab - 1), t, x_t.ndim))


def _split_output(d: GaussianDiffusion, output: Array, channels: int) -> tuple[Array, Array | None]:
    """(eps, variance values or None) of a model output [..., C or 2C]."""
    want = 2 * channels if d.var_type == "learned_range" else channels
    if output.shape[-1] != want:
        raise ValueError(f"model output has {output.shape[-1]} channels; var_type={d.var_type!r} on {channels}-channel "
                         f"data needs {want}")
    if d.var_type == "learned_range":
        return output[..., :channels], output[..., channels:]
    return output, None


def _variance(d: GaussianDiffusion, var_values: Array | None, t: Array, ndim: int) -> tuple[Array, Array]:
    """(variance, log variance) of p(x_{t-1} | x_t): learned range, or the fixed values as DiT (fixed_small: the
    posterior variance, 0 at t = 0, with the clipped log)."""
    if d.var_type == "learned_range":
        min_log = _extract(d.posterior_log_variance_clipped, t, ndim)
        max_log = _extract(np.log(d.betas), t, ndim)
        frac = (var_values + 1) / 2  # [-1, 1] -> [min, max]
        log_variance = frac * max_log + (1 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if d.var_type == "fixed_large":
        variance = np.append(d.posterior_variance[1], d.betas[1:])
        log_variance = np.log(variance)
    else:
        variance, log_variance = d.posterior_variance, d.posterior_log_variance_clipped
    return _extract(variance, t, ndim), _extract(log_variance, t, ndim)


def mean_variance(d: GaussianDiffusion, output: Array, x: Array, t: Array, *, clip_denoised: bool = False
                  ) -> dict[str, Array]:
    """p(x_{t-1} | x_t) from a model output: {'mean', 'variance', 'log_variance', 'pred_xstart'} (x_0 from eps,
    clipped to [-1, 1] with `clip_denoised`); fixed variances are [B, 1, ..., 1]."""
    eps, var_values = _split_output(d, output, x.shape[-1])
    variance, log_variance = _variance(d, var_values, t, x.ndim)
    pred_xstart = predict_xstart_from_eps(d, x, t, eps)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}


def p_mean_variance(d: GaussianDiffusion, model_fn: ModelFn, x: Array, t: Array, *, clip_denoised: bool = False
                    ) -> dict[str, Array]:
    """`mean_variance` of `model_fn(x, timestep_map[t])`."""
    return mean_variance(d, model_fn(x, jnp.asarray(d.timestep_map)[t]), x, t, clip_denoised=clip_denoised)


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
    """The tanh approximation of the standard normal CDF that ADM/DiT use."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
    """log P(bin of x) in nats under N(means, e^{2 log_scales}) discretised to the 256 levels of uint8 data scaled
    to [-1, 1] (bins of width 2/255; the edge bins extend to -inf / +inf), as ADM/DiT."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: Array) -> Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(d: GaussianDiffusion, output: Array, x_start: Array, x_t: Array, t: Array) -> Array:
    """[B] variational-bound term in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), and at
    t == 0 the decoder NLL of x_0 (no clipping of x_0 predictions)."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
    out = mean_variance(d, output, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
    log_scales = jnp.broadcast_to(0.5 * out["log_variance"], x_start.shape)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=log_scales))
    return jnp.where(t == 0, nll / math.log(2.0), kl)


def training_losses(d: GaussianDiffusion, model_fn: ModelFn, x_start: Array, t: Array, noise: Array
                    ) -> dict[str, Array]:
    """Per-example losses [B] of eps prediction at steps t: 'mse' (mean over C, H, W of (noise - eps)^2), with the
    learned-range variance 'vb' (`vb_terms_bpd` with eps detached, so the bound trains only the variance), and
    'loss' = mse (+ vb): DiT's hybrid loss, or LDM's plain L2 with a fixed variance."""
    x_t = q_sample(d, x_start, t, noise)
    output = model_fn(x_t, jnp.asarray(d.timestep_map)[t])
    eps, var_values = _split_output(d, output, x_start.shape[-1])
    terms = {"mse": _mean_flat((noise - eps) ** 2)}
    if var_values is None:
        terms["loss"] = terms["mse"]
        return terms
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
    terms["vb"] = vb_terms_bpd(d, frozen, x_start, x_t, t)
    terms["loss"] = terms["mse"] + terms["vb"]
    return terms


def p_sample(d: GaussianDiffusion, model_fn: ModelFn, x: Array, t: Array, noise: Array, *,
             clip_denoised: bool = False) -> dict[str, Array]:
    """One ancestral step: {'sample': mean + (t != 0) exp(log_variance / 2) noise, 'pred_xstart'}."""
    out = p_mean_variance(d, model_fn, x, t, clip_denoised=clip_denoised)
    nonzero = (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - 1))
    return {"sample": out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise,
            "pred_xstart": out["pred_xstart"]}


def ddim_sample(d: GaussianDiffusion, model_fn: ModelFn, x: Array, t: Array, noise: Array | None, *,
                eta: float = 0.0, clip_denoised: bool = False) -> dict[str, Array]:
    """One DDIM step of DiT's `ddim_sample` (eps re-derived from the possibly clipped x_0 prediction):
    `x_{t-1} = x0 sqrt(ab_prev) + sqrt(1 - ab_prev - sigma^2) eps + (t != 0) sigma noise`,
    `sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)`."""
    out = p_mean_variance(d, model_fn, x, t, clip_denoised=clip_denoised)
    eps = predict_eps_from_xstart(d, x, t, out["pred_xstart"])
    ab = _extract(d.alphas_cumprod, t, x.ndim)
    ab_prev = _extract(d.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
    sample = out["pred_xstart"] * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma ** 2) * eps
    if noise is not None:
        nonzero = (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - 1))
        sample = sample + nonzero * sigma * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def _is_key(noise) -> bool:
    dtype = getattr(noise, "dtype", None)
    if dtype is None:
        return False
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (dtype == jnp.uint32 and np.shape(noise) == (2,))


def _step_noises(noise, num_steps: int, shape: tuple[int, ...], dtype) -> tuple[Array, Callable[[Array], Array]]:
    """Per-step scan inputs and how to turn one into a noise array: keys split from a PRNG key, or the given
    noises [num_steps, *shape] as they are."""
    if _is_key(noise):
        return jax.random.split(noise, num_steps), lambda key: jax.random.normal(key, shape, dtype)
    if tuple(np.shape(noise)) != (num_steps, *shape):
        raise ValueError(f"noise must be a PRNG key or noises of shape {(num_steps, *shape)}, got {np.shape(noise)}")
    return jnp.asarray(noise, dtype), lambda n: n


def p_sample_loop(d: GaussianDiffusion, model_fn: ModelFn, x_T: Array, noise, *, clip_denoised: bool = False
                  ) -> Array:
    """Ancestral sampling from x_T over every step of `d` (t = T-1 .. 0) in one `lax.scan`. `noise`: a PRNG key, or
    noises [T, *x_T.shape] (entry k used at the k-th step, i.e. at t = T-1-k; the last is masked out at t = 0)."""
    steps = np.arange(d.num_timesteps)[::-1].copy()
    inputs, draw = _step_noises(noise, d.num_timesteps, x_T.shape, x_T.dtype)

    def step(x, xs):
        t, z = xs
        out = p_sample(d, model_fn, x, jnp.full(x.shape[:1], t), draw(z), clip_denoised=clip_denoised)
        return out["sample"], None

    return jax.lax.scan(step, x_T, (jnp.asarray(steps), inputs))[0]


def ddim_sample_loop(d: GaussianDiffusion, model_fn: ModelFn, x_T: Array, noise=None, *, eta: float = 0.0,
                     clip_denoised: bool = False) -> Array:
    """DiT's DDIM over every step of `d` (respace `d` for fewer) in one `lax.scan`; `noise` (a PRNG key or noises
    [T, *x_T.shape]) is needed only when eta > 0."""
    if eta < 0:
        raise ValueError(f"ddim eta={eta} must be >= 0")
    steps = jnp.asarray(np.arange(d.num_timesteps)[::-1].copy())
    if eta == 0:
        def step(x, t):
            return ddim_sample(d, model_fn, x, jnp.full(x.shape[:1], t), None, clip_denoised=clip_denoised)[
                "sample"], None

        return jax.lax.scan(step, x_T, steps)[0]
    if noise is None:
        raise ValueError(f"ddim eta={eta} > 0 needs noise (a PRNG key or pre-drawn noises)")
    inputs, draw = _step_noises(noise, d.num_timesteps, x_T.shape, x_T.dtype)

    def noisy_step(x, xs):
        t, z = xs
        out = ddim_sample(d, model_fn, x, jnp.full(x.shape[:1], t), draw(z), eta=eta, clip_denoised=clip_denoised)
        return out["sample"], None

    return jax.lax.scan(noisy_step, x_T, (steps, inputs))[0]


# ----------------------------------------------------------------------------------------------------------------
# LDM's DDIMSampler
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LDMDDIMSchedule:
    """LDM's `DDIMSampler.make_schedule` (uniform discretisation) as float32 arrays over its S steps in increasing
    t: `timesteps` (`arange(0, T, T // S) + 1`), `alphas` (ab_f32[timesteps]), `alphas_prev` (ab_f32[0], then
    alphas[:-1]), `sigmas` (`eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))`, in float64 from those values),
    `sqrt_one_minus_alphas`."""

    timesteps: np.ndarray
    alphas: np.ndarray
    alphas_prev: np.ndarray
    sigmas: np.ndarray
    sqrt_one_minus_alphas: np.ndarray


def ldm_ddim_schedule(d: GaussianDiffusion, num_steps: int, eta: float = 0.0) -> LDMDDIMSchedule:
    """`LDMDDIMSchedule` of `num_steps` DDIM steps on the DDPM `d` (its `alphas_cumprod` held in float32, as LDM's
    buffers)."""
    _check_steps(num_steps)
    if eta < 0:
        raise ValueError(f"ddim eta={eta} must be >= 0")
    total = d.num_timesteps
    if num_steps > total:
        raise ValueError(f"ddim: {num_steps} steps exceed the {total} steps of the process")
    timesteps = np.arange(0, total, total // num_steps) + 1
    if timesteps[-1] >= total:
        raise ValueError(f"ddim: {num_steps} steps of stride {total // num_steps} reach t={timesteps[-1]} >= {total}; "
                         f"choose a step count that divides {total}")
    ab = d.alphas_cumprod.astype(np.float32)
    alphas = ab[timesteps]
    alphas_prev = np.append(ab[0], alphas[:-1]).astype(np.float32)
    a, a_prev = alphas.astype(np.float64), alphas_prev.astype(np.float64)
    sigmas = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return LDMDDIMSchedule(timesteps, alphas, alphas_prev, sigmas.astype(np.float32), np.sqrt(1 - alphas))


def ldm_ddim_sample_loop(d: GaussianDiffusion, model_fn: ModelFn, x_T: Array, num_steps: int, noise=None, *,
                         eta: float = 0.0, return_intermediates: bool = False):
    """LDM's `DDIMSampler.sample` (uniform grid, eps model) in one `lax.scan`, from t = timesteps[-1] down:
    `pred_x0 = (x - sqrt(1 - a) e) / sqrt(a)`, `x = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) e + sigma z`
    (noise at every step, the last included). `model_fn(x, t)` gets the original-scale t and gives eps (guided or
    not). `noise`: a PRNG key or noises [S, *x_T.shape] (entry i at step i, the noisiest first), needed when eta > 0.
    With `return_intermediates`: (x, {'x_inter', 'pred_x0'} [S + 1, ...], entry 0 the start) as `log_every_t=1`."""
    s = ldm_ddim_schedule(d, num_steps, eta)
    order = np.arange(num_steps)[::-1].copy()  # index into the schedule, noisiest step first
    coefs = {"t": s.timesteps[order], "sqrt_a": np.sqrt(s.alphas)[order], "sqrt_1ma": s.sqrt_one_minus_alphas[order],
             "sqrt_a_prev": np.sqrt(s.alphas_prev)[order], "dir": np.sqrt(1 - s.alphas_prev - s.sigmas ** 2)[order],
             "sigma": s.sigmas[order]}
    noisy = eta > 0
    if noisy and noise is None:
        raise ValueError(f"ddim eta={eta} > 0 needs noise (a PRNG key or pre-drawn noises)")
    inputs, draw = _step_noises(noise, num_steps, x_T.shape, x_T.dtype) if noisy else (jnp.zeros(num_steps), None)

    def step(x, xs):
        c, z = xs
        e = model_fn(x, jnp.full(x.shape[:1], c["t"], jnp.int32))
        pred_x0 = (x - c["sqrt_1ma"] * e) / c["sqrt_a"]
        x = c["sqrt_a_prev"] * pred_x0 + c["dir"] * e
        if noisy:
            x = x + c["sigma"] * draw(z)
        return x, (x, pred_x0) if return_intermediates else None

    coefs = {k: jnp.asarray(v) for k, v in coefs.items()}
    x, trace = jax.lax.scan(step, x_T, (coefs, inputs))
    if not return_intermediates:
        return x
    return x, {"x_inter": jnp.concatenate([x_T[None], trace[0]]), "pred_x0": jnp.concatenate([x_T[None], trace[1]])}
