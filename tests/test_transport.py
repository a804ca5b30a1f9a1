"""SiT's transport: parity with the release (sit_tiny fixture: forward through the DiT module, 3-channel and
all-channel CFG, the Linear/velocity loss, the Euler/Heun/dopri5 ODE trajectories and the Euler-Maruyama SDE with
its recorded noises), and closed forms on Gaussian data for every path, prediction type, loss weight and sampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from vqlc_jax.generators import load_official
from vqlc_jax.generators import transport as tp
from vqlc_jax.models.dit import DiT, guided_model_fn

NULL, SCALE, STEPS = 10, 4.0, 10


def nhwc(a):
    """NCHW (with any leading axes) -> NHWC."""
    a = np.asarray(a)
    return np.moveaxis(a, -3, -1)


@pytest.fixture(scope="module")
def sit_tiny(fixtures_dir):
    root = fixtures_dir / "official_diffusion"
    with np.load(root / "sit_tiny.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["root"] = root
    return arrays


@pytest.fixture(scope="module")
def sit(sit_tiny):
    model, variables = load_official("sit", sit_tiny["root"] / "sit_tiny.pth", num_heads=4)
    return model, variables, jax.jit(lambda x, t, y: model.apply(variables, x, t, y))


@pytest.fixture(scope="module")
def dit_2c(sit_tiny):
    """The same weights through the DiT loader: the release's learn_sigma head, 2C channels."""
    model, variables = load_official("dit", sit_tiny["root"] / "sit_tiny.npz", num_heads=4)
    return jax.jit(lambda x, t, y: model.apply(variables, x, t, y))


@pytest.fixture(scope="module")
def model_fns(sit_tiny, sit):
    """The release's sampling model functions on B rows: plain, and guided on 3 channels (the rows it keeps)."""
    apply = sit[2]
    y = jnp.asarray(sit_tiny["sample_y"])
    return {"": lambda x, t: apply(x, t, y),
            "_cfg": guided_model_fn(apply, y, SCALE, null_label=NULL, eps_channels=8, channels=3)}


def test_sit_forward_and_cfg_match_release(sit_tiny, sit, dit_2c):
    model, variables, apply = sit
    assert (model.learn_sigma, model.out_channels, model.hidden_size, model.depth) == (False, 8, 64, 2)
    x, t, y = jnp.asarray(nhwc(sit_tiny["x"])), jnp.asarray(sit_tiny["t"]), jnp.asarray(sit_tiny["y"])
    release_cfg = jax.jit(functools.partial(model.apply, variables, method=DiT.forward_with_cfg, channels=3))
    errors = {"out": relative_error(apply(x, t, y), nhwc(sit_tiny["out"])),
              "out_full (dit loader)": relative_error(dit_2c(x, t, y), nhwc(sit_tiny["out_full"])),
              "out_cfg (3 channels, 2B)": relative_error(
                  release_cfg(nhwc(sit_tiny["cfg_x"]), sit_tiny["cfg_t"], sit_tiny["cfg_y"], SCALE),
                  nhwc(sit_tiny["out_cfg"])),
              "out_cfg_all (guided_model_fn)": relative_error(
                  guided_model_fn(apply, y, SCALE, null_label=NULL, eps_channels=8)(x, t),
                  nhwc(sit_tiny["out_cfg_all"])[:3])}
    print("sit_tiny forward relative errors:", errors)
    assert max(errors.values()) < 1e-5


def test_linear_velocity_loss_matches_release(sit_tiny, sit):
    y = jnp.asarray(sit_tiny["y"])
    terms = tp.training_losses(tp.Transport(), lambda x, t: sit[2](x, t, y), jnp.asarray(nhwc(sit_tiny["loss_x1"])),
                               jnp.asarray(sit_tiny["loss_t"]), jnp.asarray(nhwc(sit_tiny["loss_x0"])))
    errors = {"loss": relative_error(terms["loss"], sit_tiny["loss"]),
              "pred": relative_error(terms["pred"], nhwc(sit_tiny["loss_pred"]))}
    print("sit_tiny loss relative errors:", errors)
    assert max(errors.values()) < 1e-5


@pytest.mark.parametrize("method, tol", [("euler", 1e-4), ("heun2", 1e-4), ("dopri5", 1e-3)])
@pytest.mark.parametrize("cfg", ["", "_cfg"])
def test_ode_trajectory_matches_release(sit_tiny, model_fns, method, tol, cfg):
    z = jnp.asarray(nhwc(sit_tiny["sample_z"]))
    run = jax.jit(lambda z: tp.sample_ode(tp.Transport(), model_fns[cfg], z, method=method, num_steps=STEPS,
                                          return_trajectory=True))
    want = nhwc(sit_tiny[f"ode_{method}{cfg}"])[:, : z.shape[0]]
    error = relative_error(run(z), want)
    print(f"ode_{method}{cfg} relative error: {error:.2e}")
    assert error < tol


@pytest.mark.parametrize("cfg", ["", "_cfg"])
def test_sde_trajectory_matches_release(sit_tiny, model_fns, cfg):
    z = jnp.asarray(nhwc(sit_tiny["sample_z"]))
    noise = jnp.asarray(nhwc(sit_tiny[f"sde_noise{cfg}"])[:, : z.shape[0]])
    run = jax.jit(lambda z, n: tp.sample_sde(tp.Transport(), model_fns[cfg], z, n, num_steps=STEPS,
                                             return_trajectory=True))
    error = relative_error(run(z, noise), nhwc(sit_tiny[f"sde{cfg}"])[:, : z.shape[0]])
    print(f"sde{cfg} relative error: {error:.2e}")
    assert error < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Closed forms: data x1 ~ N(0, s^2) gives x_t ~ N(0, v_t), v_t = alpha^2 s^2 + sigma^2, with the exact score -x / v_t,
# velocity (alpha' alpha s^2 + sigma' sigma) x / v_t and noise E[x0 | x_t] = sigma x / v_t; the probability flow
# scales x by sqrt(v_t1 / v_t0).
# ----------------------------------------------------------------------------------------------------------------

S = 0.5


def _coefficients(path, t, xp=np):
    """(alpha, d_alpha, sigma, d_sigma), written out independently of the module."""
    if path == "Linear":
        return t, 1.0, 1 - t, -1.0
    a = np.pi / 2 * t
    return xp.sin(a), np.pi / 2 * xp.cos(a), xp.cos(a), -np.pi / 2 * xp.sin(a)


def exact(path, kind, x, t, xp=np):
    """The exact velocity, score or noise of x at times t [B] (xp = jnp inside samplers)."""
    alpha, d_alpha, sigma, d_sigma = _coefficients(path, t.reshape(-1, *(1,) * (x.ndim - 1)), xp)
    var = alpha ** 2 * S ** 2 + sigma ** 2
    return {"velocity": (d_alpha * alpha * S ** 2 + d_sigma * sigma) / var * x, "score": -x / var,
            "noise": sigma / var * x}[kind]


def variance(path, t):
    alpha, _, sigma, _ = _coefficients(path, t)
    return alpha ** 2 * S ** 2 + sigma ** 2


@pytest.mark.parametrize("path", tp.PATHS)
def test_conversions_between_predictions(path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 2, 3))
    t = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    v, s, n = (exact(path, k, x, t) for k in ("velocity", "score", "noise"))
    got = {"score_from_velocity": (tp.score_from_velocity(path, v, x, t), s),
           "noise_from_velocity": (tp.noise_from_velocity(path, v, x, t), n),
           "velocity_from_score": (tp.velocity_from_score(path, s, x, t), v),
           "velocity_from_noise": (tp.velocity_from_noise(path, n, x, t), v),
           "score_from_noise": (tp.score_from_noise(path, n, x, t), s)}
    errors = {k: relative_error(a, b) for k, (a, b) in got.items()}
    assert max(errors.values()) < 1e-5, errors
    x0, x1 = rng.standard_normal((2, 5, 2, 2, 3))
    alpha, d_alpha, sigma, d_sigma = _coefficients(path, t.reshape(-1, 1, 1, 1))
    _, xt, ut = tp.plan(path, jnp.asarray(t), x0, x1)
    assert relative_error(xt, alpha * x1 + sigma * x0) < 1e-6
    assert relative_error(ut, d_alpha * x1 + d_sigma * x0) < 1e-6


@pytest.mark.parametrize("path", tp.PATHS)
@pytest.mark.parametrize("prediction, weight", [("noise", None), ("noise", "likelihood"), ("score", "velocity")])
def test_loss_weights(path, prediction, weight):
    """An exact prediction costs 0; one off by 1 (the score by 1 / sigma_t) costs the weight: Linear 1 / t^2
    ("velocity"), 1 / (t (1 - t)) ("likelihood"); GVP (pi / (2 sin a))^2 and pi / sin(2 a), a = pi t / 2."""
    transport = tp.Transport(path, prediction, weight)
    rng = np.random.default_rng(1)
    x1, x0 = rng.standard_normal((2, 4, 2, 2, 3)).astype(np.float32)
    t = np.array([0.2, 0.4, 0.6, 0.8], np.float32)
    sigma = _coefficients(path, t)[2].reshape(-1, 1, 1, 1)
    target, unit = (x0, 1.0) if prediction == "noise" else (-x0 / sigma, 1 / sigma)
    exact_loss = tp.training_losses(transport, lambda x, tt: jnp.asarray(target), x1, t, x0)["loss"]
    off = tp.training_losses(transport, lambda x, tt: jnp.asarray(target + unit), x1, t, x0)["loss"]
    a = np.pi * t / 2
    want = {("Linear", None): 1.0, ("Linear", "velocity"): 1 / t ** 2, ("Linear", "likelihood"): 1 / (t * (1 - t)),
            ("GVP", None): 1.0, ("GVP", "velocity"): (np.pi / (2 * np.sin(a))) ** 2,
            ("GVP", "likelihood"): np.pi / np.sin(2 * a)}[(path, weight)]
    assert np.abs(exact_loss).max() < 1e-5
    assert relative_error(off, np.broadcast_to(want, t.shape)) < 1e-5


def test_training_times_and_intervals():
    key = jax.random.key(0)
    x1 = jnp.zeros((4096, 1, 1, 1))
    for transport, (lo, hi) in ((tp.Transport(), (0, 1)), (tp.Transport("GVP", "noise"), (1e-3, 1 - 1e-3))):
        t, x0 = tp.sample_t_x0(transport, key, x1)
        assert transport.train_interval() == pytest.approx((lo, hi))
        assert lo <= float(t.min()) < lo + 0.01 and hi - 0.01 < float(t.max()) <= hi and x0.shape == x1.shape
        assert abs(float(x0.std()) - 1) < 0.05
    assert tp.Transport("Linear", "score").ode_interval(reverse=True) == pytest.approx((1 - 1e-3, 1e-3))
    assert tp.Transport().sde_interval("sigma", 0.04) == pytest.approx((0.0, 0.96))
    assert tp.Transport(sample_eps=0.01).sde_interval("SBDM", 0.0) == pytest.approx((0.01, 0.99))


@pytest.mark.parametrize("path, prediction, method", [("Linear", "velocity", "dopri5"), ("GVP", "score", "heun2"),
                                                      ("GVP", "noise", "dopri5")])
def test_ode_carries_the_gaussian_flow(path, prediction, method):
    """With the exact model the ODE maps x at t0 to sqrt(v_t1 / v_t0) x: dopri5 to its tolerance, and the reversed
    ODE maps it back; heun2 converges at order 2 (halving the step quarters the error)."""
    transport = tp.Transport(path, prediction)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2, 2, 2)), jnp.float32)
    run = functools.partial(tp.sample_ode, transport, lambda x, t: exact(path, prediction, x, t, jnp), method=method,
                            atol=1e-7, rtol=1e-7, num_steps=41)
    t0, t1 = transport.ode_interval()
    want = np.sqrt(variance(path, t1) / variance(path, t0)) * x
    if method == "heun2":
        coarse, fine = jax.jit(lambda x: (run(x, num_steps=21), run(x)))(x)
        errors = {"20 steps": relative_error(coarse, want), "40 steps": relative_error(fine, want)}
        assert errors["40 steps"] < 1e-3 and 3.5 < errors["20 steps"] / errors["40 steps"] < 4.5, errors
    else:
        fine, back = jax.jit(lambda x: (y := run(x), run(y, reverse=True)))(x)
        errors = {"forward": relative_error(fine, want), "round trip": relative_error(back, x)}
        assert max(errors.values()) < 1e-5, errors
    print(f"{path}/{prediction} {method} Gaussian flow relative errors: {errors}")


@pytest.mark.parametrize("path, prediction, form, last_step", [("Linear", "velocity", "sigma", "Mean"),
                                                               ("GVP", "noise", "SBDM", "Tweedie"),
                                                               ("Linear", "score", "linear", "Euler")])
def test_sde_samples_the_data_distribution(path, prediction, form, last_step):
    """From N(0, v_t0) the SDE with the exact model ends near N(0, s^2) (its variance within a few percent)."""
    transport = tp.Transport(path, prediction)
    t0, _ = transport.sde_interval(form, 0.04)
    x = jnp.sqrt(variance(path, t0)) * jax.random.normal(jax.random.key(3), (8192, 1, 1, 1))
    model = lambda x, t: exact(path, prediction, x, t, jnp)  # noqa: E731
    out = jax.jit(lambda x, key: tp.sample_sde(transport, model, x, key, diffusion_form=form, last_step=last_step,
                                               num_steps=100))(x, jax.random.key(4))
    assert abs(float(jnp.std(out)) / S - 1) < 0.05 and abs(float(jnp.mean(out))) < 0.05 * S


def test_bad_settings_are_refused(model_fns, dit_2c):
    z = jnp.zeros((3, 8, 8, 8))
    with pytest.raises(ValueError, match="path 'VP'"):
        tp.Transport("VP")
    with pytest.raises(ValueError, match="prediction 'eps'"):
        tp.Transport(prediction="eps")
    with pytest.raises(ValueError, match="loss_weight='velocity'"):
        tp.Transport(loss_weight="velocity")
    with pytest.raises(ValueError, match="ODE method 'rk4'"):
        tp.sample_ode(tp.Transport(), model_fns[""], z, method="rk4")
    with pytest.raises(ValueError, match="num_steps=1"):
        tp.sample_ode(tp.Transport(), model_fns[""], z, num_steps=1)
    with pytest.raises(ValueError, match="num_steps=0"):
        tp.sample_sde(tp.Transport(), model_fns[""], z, jax.random.key(0), num_steps=0)
    with pytest.raises(ValueError, match="SBDM diffusion is infinite"):
        tp.sample_sde(tp.Transport(), model_fns[""], z, jax.random.key(0), diffusion_form="SBDM")
    with pytest.raises(ValueError, match="diffusion form 'inccreasing-decreasing'"):
        tp.sample_sde(tp.Transport(), model_fns[""], z, jax.random.key(0), diffusion_form="inccreasing-decreasing")
    with pytest.raises(ValueError, match="noise must be a PRNG key or noises of shape"):
        tp.sample_sde(tp.Transport(), model_fns[""], z, jnp.zeros((3, 3, 8, 8, 8)), num_steps=10)
    gaussian = lambda x, t: exact("Linear", "velocity", x, t, jnp)  # noqa: E731
    assert np.isnan(tp.sample_ode(tp.Transport(), gaussian, z[:, :2, :2, :2], rtol=1e-7, max_steps=2)).all()
    with pytest.raises(ValueError, match=r"model output \(3, 8, 8, 16\) must have the input's shape"):
        tp.sample_ode(tp.Transport(), lambda x, t: dit_2c(x, t, jnp.zeros(3, jnp.int32)), z, method="euler",
                      num_steps=2)


def test_samplers_on_a_sharded_batch():
    """Both samplers compile over a batch sharded on the data axis of 8 devices, keep it sharded (no host check
    that would replicate it) and match the unsharded run."""
    sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)), jax.sharding.PartitionSpec("data"))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((16, 2, 2, 2)), jnp.float32)
    model = lambda x, t: exact("GVP", "velocity", x, t, jnp)  # noqa: E731
    transport = tp.Transport("GVP")

    def both(x, key):
        return tp.sample_ode(transport, model, x), tp.sample_sde(transport, model, x, key, num_steps=20)

    sharded = jax.jit(both, in_shardings=(sharding, None))(x, jax.random.key(6))
    for got, want in zip(sharded, jax.jit(both)(x, jax.random.key(6))):
        assert got.sharding.is_equivalent_to(sharding, got.ndim) and relative_error(got, want) < 1e-6
