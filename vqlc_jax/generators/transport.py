"""SiT's transport (willisma/SiT `transport/`, as the VQGAN-LC release's `sit-lc/transport/`): interpolant paths,
prediction types and their conversions, the training loss and the ODE/SDE samplers, all pure.

Time runs from noise to data: `x_t = alpha_t x1 + sigma_t x0`, the noise x0 ~ N(0, I) at t = 0 and the data x1 at
t = 1; "Linear": alpha_t = t, sigma_t = 1 - t; "GVP": alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2). A model is
`model_fn(x, t) -> output` on NHWC arrays with t [B] float32 in [0, 1]; its output has the shape of x and is the
velocity, the score or the noise (`Transport.prediction`): a SiT as `load_official("sit")` gives it, guided with
`vqlc_jax.models.dit.guided_model_fn`. The ODE sampler is one `diffrax.diffeqsolve`, the SDE sampler one `lax.scan`;
jit the caller (batch sharding included).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.generators.diffusion import _mean_flat, _step_noises

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
PATHS = ("Linear", "GVP")
PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")
# torchdiffeq's method names (the release passes them to `odeint`) -> the same Runge-Kutta tableau in diffrax.
ODE_METHODS = {"dopri5": diffrax.Dopri5, "euler": diffrax.Euler, "heun2": diffrax.Heun}


def _expand(t: Array, x: Array) -> Array:
    """t (scalar or [B]) shaped [B, 1, ..., 1] to broadcast over x."""
    t = jnp.asarray(t)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _choose(kind: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choices: {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------------------------------------------
# Paths (SiT's `path.py`: ICPlan = "Linear", GVPCPlan = "GVP"); t is already broadcast unless said otherwise
# ----------------------------------------------------------------------------------------------------------------

def compute_alpha_t(path: str, t: Array) -> tuple[Array, Array]:
    """(alpha_t, d alpha_t / dt): the data coefficient."""
    _choose("path", path, PATHS)
    if path == "Linear":
        return t, jnp.ones_like(t)
    return jnp.sin(t * np.pi / 2), np.pi / 2 * jnp.cos(t * np.pi / 2)


def compute_sigma_t(path: str, t: Array) -> tuple[Array, Array]:
    """(sigma_t, d sigma_t / dt): the noise coefficient."""
    _choose("path", path, PATHS)
    if path == "Linear":
        return 1 - t, -jnp.ones_like(t)
    return jnp.cos(t * np.pi / 2), -np.pi / 2 * jnp.sin(t * np.pi / 2)


def d_alpha_alpha_ratio(path: str, t: Array) -> Array:
    """d alpha_t / alpha_t (1 / t; GVP: pi / (2 tan(pi t / 2))), infinite at t = 0."""
    _choose("path", path, PATHS)
    return 1 / t if path == "Linear" else np.pi / (2 * jnp.tan(t * np.pi / 2))


def compute_drift(path: str, x: Array, t: Array) -> tuple[Array, Array]:
    """SiT's `compute_drift` (t [B]): (drift_mean, drift_var) = (-r x, r sigma^2 - sigma d_sigma) with r the
    `d_alpha_alpha_ratio`; the probability-flow velocity is `-drift_mean + drift_var score`."""
    t = _expand(t, x)
    ratio = d_alpha_alpha_ratio(path, t)
    sigma, d_sigma = compute_sigma_t(path, t)
    return -ratio * x, ratio * sigma ** 2 - sigma * d_sigma


def compute_diffusion(path: str, x: Array, t: Array, form: str = "sigma", norm: float = 1.0) -> Array:
    """SiT's `compute_diffusion` D(t) [B, 1, ...] (t [B]); the SDE's noise is sqrt(2 D). Forms: "constant" (norm),
    "SBDM" (norm drift_var), "sigma" (norm sigma_t), "linear" (norm (1 - t)), "decreasing"
    (0.25 (norm cos(pi t) + 1)^2), "increasing-decreasing" (norm sin(pi t)^2; the release misspells it
    "inccreasing-decreasing" and so rejects the name its command line offers)."""
    _choose("diffusion form", form, DIFFUSION_FORMS)
    t = _expand(t, x)
    forms = {"constant": lambda: norm * jnp.ones_like(t),
             "SBDM": lambda: norm * compute_drift(path, x, t)[1],
             "sigma": lambda: norm * compute_sigma_t(path, t)[0],
             "linear": lambda: norm * (1 - t),
             "decreasing": lambda: 0.25 * (norm * jnp.cos(np.pi * t) + 1) ** 2,
             "increasing-decreasing": lambda: norm * jnp.sin(np.pi * t) ** 2}
    return forms[form]()


def compute_mu_t(path: str, t: Array, x0: Array, x1: Array) -> Array:
    """x_t = alpha_t x1 + sigma_t x0 (t [B]; SiT's paths are deterministic given x0, so this is also `xt`)."""
    t = _expand(t, x1)
    return compute_alpha_t(path, t)[0] * x1 + compute_sigma_t(path, t)[0] * x0


def compute_ut(path: str, t: Array, x0: Array, x1: Array) -> Array:
    """The path's velocity u_t = d_alpha_t x1 + d_sigma_t x0 (t [B]); Linear: x1 - x0."""
    t = _expand(t, x1)
    return compute_alpha_t(path, t)[1] * x1 + compute_sigma_t(path, t)[1] * x0


def plan(path: str, t: Array, x0: Array, x1: Array) -> tuple[Array, Array, Array]:
    """SiT's coupling plan: (t, x_t, u_t) for noise x0 and data x1."""
    return t, compute_mu_t(path, t, x0, x1), compute_ut(path, t, x0, x1)


# ----------------------------------------------------------------------------------------------------------------
# Conversions between predictions (t [B])
# ----------------------------------------------------------------------------------------------------------------

def score_from_velocity(path: str, velocity: Array, x: Array, t: Array) -> Array:
    """`(r v - x) / (sigma^2 - r d_sigma sigma)` with r = alpha / d_alpha (Linear: `(t v - x) / (1 - t)`)."""
    t = _expand(t, x)
    alpha, d_alpha = compute_alpha_t(path, t)
    sigma, d_sigma = compute_sigma_t(path, t)
    ratio = alpha / d_alpha
    return (ratio * velocity - x) / (sigma ** 2 - ratio * d_sigma * sigma)


def noise_from_velocity(path: str, velocity: Array, x: Array, t: Array) -> Array:
    """`(r v - x) / (r d_sigma - sigma)` with r = alpha / d_alpha (Linear: `x - t v`)."""
    t = _expand(t, x)
    alpha, d_alpha = compute_alpha_t(path, t)
    sigma, d_sigma = compute_sigma_t(path, t)
    ratio = alpha / d_alpha
    return (ratio * velocity - x) / (ratio * d_sigma - sigma)


def velocity_from_score(path: str, score: Array, x: Array, t: Array) -> Array:
    """The probability-flow velocity `drift_var score - drift_mean` (`compute_drift`)."""
    drift_mean, drift_var = compute_drift(path, x, t)
    return drift_var * score - drift_mean


def score_from_noise(path: str, noise: Array, x: Array, t: Array) -> Array:
    """`-noise / sigma_t`."""
    return noise / -compute_sigma_t(path, _expand(t, x))[0]


def velocity_from_noise(path: str, noise: Array, x: Array, t: Array) -> Array:
    """`velocity_from_score` of `score_from_noise` (SiT's `noise_ode`)."""
    return velocity_from_score(path, score_from_noise(path, noise, x, t), x, t)


# ----------------------------------------------------------------------------------------------------------------
# Transport: the settings, the training loss and the model wrappers
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Transport:
    """SiT's `create_transport(path_type, prediction, loss_weight, train_eps, sample_eps)` for the Linear and GVP
    paths. `train_eps` / `sample_eps` None take SiT's values: 0 for velocity prediction (stable on [0, 1]; its
    training times are U[0, 1) whatever train_eps), 1e-3 otherwise. `loss_weight` ("velocity", "likelihood")
    weighs the score and noise losses; SiT ignores it for velocity prediction, where it is refused here."""

    path: str = "Linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float | None = None
    sample_eps: float | None = None

    def __post_init__(self):
        _choose("path", self.path, PATHS)
        _choose("prediction", self.prediction, PREDICTIONS)
        _choose("loss weight", self.loss_weight, LOSS_WEIGHTS)
        if self.loss_weight is not None and self.prediction == "velocity":
            raise ValueError(f"loss_weight={self.loss_weight!r} applies to score and noise prediction only (SiT "
                             "ignores it for velocity); use None")
        default = 0.0 if self.prediction == "velocity" else 1e-3
        for name in ("train_eps", "sample_eps"):
            value = default if getattr(self, name) is None else float(getattr(self, name))
            if not 0 <= value < 0.5:
                raise ValueError(f"Transport {name}={value} must lie in [0, 0.5)")
            object.__setattr__(self, name, value)

    def train_interval(self) -> tuple[float, float]:
        """Training times U[t0, t1): [0, 1] for velocity, [train_eps, 1 - train_eps] otherwise (`check_interval`)."""
        eps = self.train_eps
        return (0.0, 1.0) if self.prediction == "velocity" else (eps, 1 - eps)

    def ode_interval(self, reverse: bool = False) -> tuple[float, float]:
        """(t0, t1) of the ODE: [0, 1] for velocity, [sample_eps, 1 - sample_eps] otherwise; `reverse` (data to
        noise) maps each end t to 1 - t."""
        eps = self.sample_eps
        t0, t1 = (0.0, 1.0) if self.prediction == "velocity" else (eps, 1 - eps)
        return (1 - t0, 1 - t1) if reverse else (t0, t1)

    def sde_interval(self, diffusion_form: str, last_step_size: float) -> tuple[float, float]:
        """(t0, t1) of the Euler-Maruyama steps: t0 = sample_eps for SBDM or non-velocity prediction, else 0;
        t1 = 1 - last_step_size (1 - sample_eps without a last step)."""
        eps = self.sample_eps
        t0 = eps if diffusion_form == "SBDM" or self.prediction != "velocity" else 0.0
        return t0, 1 - (last_step_size if last_step_size else eps)


def _checked(output: Array, x: Array) -> Array:
    if output.shape != x.shape:
        raise ValueError(f"transport: the model output {tuple(output.shape)} must have the input's shape "
                         f"{tuple(x.shape)} (a learn_sigma DiT has 2C channels: read SiT with load_official('sit'))")
    return output


def to_velocity(transport: Transport, output: Array, x: Array, t: Array) -> Array:
    """The probability-flow velocity from a model output (SiT's `get_drift`)."""
    if transport.prediction == "velocity":
        return output
    if transport.prediction == "noise":
        return velocity_from_noise(transport.path, output, x, t)
    return velocity_from_score(transport.path, output, x, t)


def to_score(transport: Transport, output: Array, x: Array, t: Array) -> Array:
    """The score from a model output (SiT's `get_score`)."""
    if transport.prediction == "velocity":
        return score_from_velocity(transport.path, output, x, t)
    if transport.prediction == "noise":
        return score_from_noise(transport.path, output, x, t)
    return output


def velocity_fn(transport: Transport, model_fn: ModelFn) -> ModelFn:
    """`(x, t) -> velocity` of a model of any prediction type."""
    return lambda x, t: to_velocity(transport, _checked(model_fn(x, t), x), x, t)


def sample_t_x0(transport: Transport, key: Array, x1: Array) -> tuple[Array, Array]:
    """SiT's `Transport.sample`: t [B] ~ U(`train_interval`) and noise x0 ~ N(0, I) like the data x1."""
    t0, t1 = transport.train_interval()
    key_t, key_x = jax.random.split(key)
    t = jax.random.uniform(key_t, x1.shape[:1], jnp.float32) * (t1 - t0) + t0
    return t, jax.random.normal(key_x, x1.shape, x1.dtype)


def training_losses(transport: Transport, model_fn: ModelFn, x1: Array, t: Array, x0: Array) -> dict[str, Array]:
    """SiT's `training_losses` at times t [B] with noise x0: {'loss' [B], 'pred'}. Velocity: mean over C, H, W of
    `(pred - u_t)^2`; noise: `w (pred - x0)^2`; score: `w (pred sigma_t + x0)^2`, with w = 1, `(drift_var /
    sigma_t)^2` ("velocity") or `drift_var / sigma_t^2` ("likelihood")."""
    t, xt, ut = plan(transport.path, t, x0, x1)
    pred = _checked(model_fn(xt, t), xt)
    if transport.prediction == "velocity":
        return {"loss": _mean_flat((pred - ut) ** 2), "pred": pred}
    _, drift_var = compute_drift(transport.path, xt, t)
    sigma = compute_sigma_t(transport.path, _expand(t, xt))[0]
    weight = {None: 1.0, "velocity": (drift_var / sigma) ** 2, "likelihood": drift_var / sigma ** 2}[
        transport.loss_weight]
    error = pred - x0 if transport.prediction == "noise" else pred * sigma + x0
    return {"loss": _mean_flat(weight * error ** 2), "pred": pred}


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------

def _check_num_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"transport sampler: num_steps={num_steps!r} must be an integer >= 2 (the output times "
                         "include both ends)")


def sample_ode(transport: Transport, model_fn: ModelFn, x: Array, *, method: str = "dopri5", num_steps: int = 50,
               atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False, return_trajectory: bool = False,
               max_steps: int = 4096) -> Array:
    """SiT's `sample_ode`: dx/dt = velocity(x, t) from x over `ode_interval(reverse)`, as one `diffeqsolve`.

    The output times are `linspace(t0, t1, num_steps)`. "euler" and "heun2" (torchdiffeq's names, which the release
    passes) step on exactly that grid (num_steps - 1 steps; heun2 calls the model twice a step). "dopri5" (SiT's
    default) is adaptive: an I-controller on the RMS over the whole batch of the error scaled by
    `atol + rtol max(|y0|, |y1|)` (torchdiffeq's rule: one step sequence for all rows), its dense output read at the
    output times, so `num_steps` does not set the number of model calls. Returns the state at t1, or with
    `return_trajectory` the release's `odeint` output [num_steps, *x.shape] (entry 0 = x); all NaN when dopri5
    needs more than `max_steps` steps.
    """
    _choose("ODE method", method, tuple(ODE_METHODS))
    _check_num_steps(num_steps)
    t0, t1 = transport.ode_interval(reverse)
    ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
    drift = velocity_fn(transport, model_fn)
    term = diffrax.ODETerm(lambda t, y, args: drift(y, jnp.full(y.shape[:1], t, jnp.float32)))
    controller = (diffrax.PIDController(rtol=rtol, atol=atol) if method == "dopri5" else diffrax.StepTo(ts))
    saveat = diffrax.SaveAt(ts=ts) if return_trajectory else diffrax.SaveAt(t1=True)
    # throw=False: diffrax's error check is a host callback that would replicate a sharded batch.
    solution = diffrax.diffeqsolve(term, ODE_METHODS[method](), t0, t1, None, x, saveat=saveat,
                                   stepsize_controller=controller, max_steps=max_steps, throw=False)
    ys = jnp.where(solution.result == diffrax.RESULTS.successful, solution.ys, jnp.nan)
    return ys if return_trajectory else ys[0]


def sample_sde(transport: Transport, model_fn: ModelFn, x: Array, noise, *, diffusion_form: str = "sigma",
               diffusion_norm: float = 1.0, last_step: str | None = "Mean", last_step_size: float = 0.04,
               num_steps: int = 250, return_trajectory: bool = False) -> Array:
    """SiT's `sample_sde` with Euler-Maruyama (the defaults of its command line), one model call a step.

    On `ts = linspace(t0, t1, num_steps)` (`sde_interval`), for each t of ts[:-1]: `drift = v + D score`,
    `x += drift dt + sqrt(2 D) sqrt(dt) z` (D = `compute_diffusion`); then the last step at t1: "Mean"
    `x + drift(x, t1) last_step_size` (no noise), "Euler" `x + v last_step_size`, "Tweedie"
    `x / alpha + sigma^2 / alpha score`, None: x as it is (and t1 = 1 - sample_eps). `last_step_size` is the
    release's fixed 0.04, not tied to num_steps. `noise`: a PRNG key or noises [num_steps - 1, *x.shape] (entry k
    at the k-th step). Returns the sample, or with `return_trajectory` [num_steps, *x.shape]: the state after
    each step, the last step's result last (the start is not included), as the release.
    """
    _choose("diffusion form", diffusion_form, DIFFUSION_FORMS)
    _choose("last step", last_step, LAST_STEPS)
    _check_num_steps(num_steps)
    if last_step is None:
        last_step_size = 0.0
    if not 0 <= last_step_size < 1:
        raise ValueError(f"sample_sde: last_step_size={last_step_size} must lie in [0, 1)")
    t0, t1 = transport.sde_interval(diffusion_form, last_step_size)
    if diffusion_form == "SBDM" and t0 == 0:
        raise ValueError("sample_sde: the SBDM diffusion is infinite at t = 0; give the Transport a sample_eps > 0")
    path = transport.path
    ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
    dt = ts[1] - ts[0]
    inputs, draw = _step_noises(noise, num_steps - 1, x.shape, x.dtype)

    def velocity_score_diffusion(x, t):
        t = jnp.full(x.shape[:1], t, jnp.float32)
        output = _checked(model_fn(x, t), x)
        diffusion = compute_diffusion(path, x, t, diffusion_form, diffusion_norm)
        return to_velocity(transport, output, x, t), to_score(transport, output, x, t), diffusion

    def step(x, xs):
        t, z = xs
        velocity, score, diffusion = velocity_score_diffusion(x, t)
        x = x + (velocity + diffusion * score) * dt + jnp.sqrt(2 * diffusion) * (draw(z) * jnp.sqrt(dt))
        return x, x if return_trajectory else None

    x, trace = jax.lax.scan(step, x, (ts[:-1], inputs))
    if last_step is not None:
        velocity, score, diffusion = velocity_score_diffusion(x, jnp.float32(t1))
        if last_step == "Mean":
            x = x + (velocity + diffusion * score) * last_step_size
        elif last_step == "Euler":
            x = x + velocity * last_step_size
        else:
            alpha = compute_alpha_t(path, jnp.float32(t1))[0]
            x = x / alpha + compute_sigma_t(path, jnp.float32(t1))[0] ** 2 / alpha * score
    return jnp.concatenate([trace, x[None]]) if return_trajectory else x
