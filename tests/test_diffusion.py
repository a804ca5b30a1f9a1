"""Gaussian diffusion: parity with DiT's `diffusion/` (dit_tiny fixture: schedules, q_sample, losses, p_mean_variance,
p_sample, respacing, the DDIM and ancestral loops with the recorded noises) and with LDM's schedule and DDIM
(ldm_tiny: schedule arrays, q_sample; the DDIM loop against a numpy reference with a stand-in model, and against the
release's arrays once the LDM UNet loader exists)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from vqlc_jax.convert.official_dit import load_official_dit
from vqlc_jax.generators import diffusion as gd
from vqlc_jax.models.dit import DiT, guided_model_fn

NULL = 10


def nhwc(a):
    a = np.asarray(a)
    return a.transpose(*range(a.ndim - 3), a.ndim - 2, a.ndim - 1, a.ndim - 3)


@pytest.fixture(scope="module")
def dit_tiny(fixtures_dir):
    root = fixtures_dir / "official_generators"
    with np.load(root / "dit_tiny.npz") as data:
        arrays = {k: data[k] for k in data.files}
    model, variables = load_official_dit(root / "dit_tiny.npz", num_heads=4)
    arrays["apply"] = jax.jit(lambda x, t, y: model.apply(variables, x, t, y))
    arrays["apply_cfg"] = jax.jit(lambda x, t, y: model.apply(variables, x, t, y, 4.0, channels=3,
                                                              method=DiT.forward_with_cfg))
    return arrays


@pytest.fixture(scope="module")
def ldm_tiny(fixtures_dir):
    root = fixtures_dir / "official_diffusion"
    with np.load(root / "ldm_tiny.npz") as data:
        arrays = {k: data[k] for k in data.files if not k.startswith("state_dict/")}
    arrays["meta"] = json.loads((root / "ldm_tiny.json").read_text())
    arrays["pth"] = root / "ldm_tiny.pth"
    return arrays


def check(errors: dict, tolerance: float, title: str) -> None:
    print(f"{title} relative errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < tolerance, errors


def test_dit_schedules(dit_tiny):
    d = gd.create_diffusion("dit")
    errors = {name: relative_error(getattr(d, name), dit_tiny[f"diffusion/{name}"])
              for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped")}
    spaced = gd.create_diffusion("dit", respacing="25")
    np.testing.assert_array_equal(spaced.timestep_map, dit_tiny["respaced/timestep_map"])
    errors.update({f"respaced/{n}": relative_error(getattr(spaced, n), dit_tiny[f"respaced/{n}"])
                   for n in ("betas", "alphas_cumprod")})
    check(errors, 1e-12, "dit_tiny schedules (float64)")


def test_q_sample_losses_and_decoder_nll(dit_tiny):
    d = gd.create_diffusion("dit")
    x, noise = jnp.asarray(nhwc(dit_tiny["x"])), jnp.asarray(nhwc(dit_tiny["noise"]))
    y = jnp.asarray(dit_tiny["y"])
    losses = jax.jit(lambda x, t, n: gd.training_losses(d, lambda a, s: dit_tiny["apply"](a, s, y), x, t, n))(
        x, jnp.asarray(dit_tiny["t_train"]), noise)
    errors = {"q_sample": relative_error(gd.q_sample(d, x, jnp.asarray(dit_tiny["t"]), noise),
                                         nhwc(dit_tiny["q_sample"])),
              **{f"training_losses/{k}": relative_error(losses[k], dit_tiny[f"training_losses/{k}"])
                 for k in ("mse", "vb", "loss")},
              "dnll_log_probs": relative_error(gd.discretized_gaussian_log_likelihood(
                  jnp.asarray(dit_tiny["dnll_x"]), means=jnp.asarray(dit_tiny["dnll_means"]),
                  log_scales=jnp.asarray(dit_tiny["dnll_log_scales"])), dit_tiny["dnll_log_probs"])}
    check(errors, 1e-5, "dit_tiny q_sample / losses")


def test_vb_gradient_reaches_only_the_variance(dit_tiny):
    """DiT's hybrid loss: the VB term is computed on a detached eps, so it trains only the variance channels."""
    d = gd.create_diffusion("dit")
    x, noise, t = (jnp.asarray(nhwc(dit_tiny["x"])), jnp.asarray(nhwc(dit_tiny["noise"])),
                   jnp.asarray(dit_tiny["t_train"]))
    out = dit_tiny["apply"](gd.q_sample(d, x, t, noise), t, jnp.asarray(dit_tiny["y"]))
    grad = jax.grad(lambda o: gd.training_losses(d, lambda *_: o, x, t, noise)["vb"].sum())(out)
    assert not np.any(grad[..., :8]) and np.any(grad[..., 8:])


def test_p_mean_variance_and_p_sample(dit_tiny):
    d = gd.create_diffusion("dit")
    x_t, t = jnp.asarray(nhwc(dit_tiny["q_sample"])), jnp.asarray(dit_tiny["t"])
    model_fn = lambda a, s: dit_tiny["apply"](a, s, jnp.asarray(dit_tiny["y"]))  # noqa: E731
    errors, pred_xstart_abs = {}, 0.0
    for clip, prefix in ((True, "p_mean_variance"), (False, "p_mean_variance_noclip")):
        out = gd.p_mean_variance(d, model_fn, x_t, t, clip_denoised=clip)
        for k in ("mean", "variance", "log_variance", "pred_xstart"):
            if clip and k == "pred_xstart":  # README: 2e-4 absolute (a difference of two ~750-sized terms at t = 999)
                pred_xstart_abs = float(np.abs(out[k] - nhwc(dit_tiny[f"{prefix}/{k}"])).max())
                continue
            errors[f"{prefix}/{k}"] = relative_error(out[k], nhwc(dit_tiny[f"{prefix}/{k}"]))
    sample = gd.p_sample(d, model_fn, x_t, t, jnp.asarray(nhwc(dit_tiny["p_sample_noise"])))
    errors.update({f"p_sample/{k}": relative_error(sample[k], nhwc(dit_tiny[f"p_sample/{k}"]))
                   for k in ("sample", "pred_xstart")})
    print("p_mean_variance/pred_xstart max abs error:", f"{pred_xstart_abs:.2e}")
    assert pred_xstart_abs < 2e-4
    check(errors, 1e-5, "dit_tiny p_mean_variance / p_sample")


def test_dit_sampling_loops(dit_tiny):
    """The respaced ("25") loops of the release: DDIM (eta 0) plain and with its 3-channel CFG on 2B rows, and the
    ancestral loop of `evaluation.py` with the recorded noises; the B-row guided model function gives the kept
    (first) half of the CFG runs."""
    d = gd.create_diffusion("dit", respacing="25")
    z, y = jnp.asarray(nhwc(dit_tiny["loop_z"])), jnp.asarray(dit_tiny["y_loop"])
    z2, y2 = jnp.concatenate([z, z]), jnp.concatenate([y, jnp.full_like(y, NULL)])
    noises = jnp.asarray(nhwc(dit_tiny["p_sample_loop_noises"]))
    plain = lambda a, s: dit_tiny["apply"](a, s, y)  # noqa: E731
    cfg = lambda a, s: dit_tiny["apply_cfg"](a, s, y2)  # noqa: E731
    guided = guided_model_fn(dit_tiny["apply"], y, 4.0, null_label=NULL, eps_channels=8, channels=3)
    ddim = jax.jit(lambda fn, x: gd.ddim_sample_loop(d, fn, x), static_argnums=0)
    ancestral = jax.jit(lambda fn, x, n: gd.p_sample_loop(d, fn, x, n), static_argnums=0)
    errors = {"ddim_cond": relative_error(ddim(plain, z), nhwc(dit_tiny["ddim_cond"])),
              "ddim_cfg": relative_error(ddim(cfg, z2), nhwc(dit_tiny["ddim_cfg"])),
              "ddim_cfg (B rows)": relative_error(ddim(guided, z), nhwc(dit_tiny["ddim_cfg"])[:3]),
              "p_sample_loop_cfg": relative_error(ancestral(cfg, z2, noises), nhwc(dit_tiny["p_sample_loop_cfg"])),
              "p_sample_loop_cfg (B rows)": relative_error(ancestral(guided, z, noises[:, :3]),
                                                           nhwc(dit_tiny["p_sample_loop_cfg"])[:3])}
    check(errors, 1e-4, "dit_tiny sampling loops")


def _stand_in_eps(x, t, xp=jnp):
    """A smooth deterministic eps model that depends on x and t."""
    t = xp.asarray(t, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.5 * xp.tanh(x) + 0.1 * xp.cos(t / 100.0)


def test_fixed_variances_and_ldm_loss():
    """Fixed variances (DiT without learned sigma: beta_t with the posterior variance at t = 0; the posterior
    variance, 0 at t = 0 with the log clipped to the t = 1 value) and the plain L2 loss of LDM, against the
    formulas in float64."""
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 2, 2, 4)).astype(np.float32)
    t = np.array([0, 500, 999])
    for var_type in ("fixed_large", "fixed_small"):
        d = gd.create_diffusion("ldm", var_type=var_type)
        b, ab = d.betas, np.cumprod(1 - d.betas)
        ab_prev = np.append(1.0, ab[:-1])
        post = b * (1 - ab_prev) / (1 - ab)
        want_var = np.append(post[1], b[1:]) if var_type == "fixed_large" else post
        want_log = np.log(np.append(want_var[1], want_var[1:]) if var_type == "fixed_small" else want_var)
        x_t = np.sqrt(ab[t])[:, None, None, None] * x0 + np.sqrt(1 - ab[t])[:, None, None, None] * noise
        eps = np.asarray(_stand_in_eps(x_t.astype(np.float64), t, np))
        x0_hat = (x_t - np.sqrt(1 - ab[t])[:, None, None, None] * eps) / np.sqrt(ab[t])[:, None, None, None]
        mean = ((b * np.sqrt(ab_prev) / (1 - ab))[t][:, None, None, None] * x0_hat
                + ((1 - ab_prev) * np.sqrt(1 - b) / (1 - ab))[t][:, None, None, None] * x_t)
        out = gd.p_mean_variance(d, _stand_in_eps, jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
        losses = gd.training_losses(d, _stand_in_eps, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
        errors = {"variance": relative_error(out["variance"][:, 0, 0, 0], want_var[t]),
                  "log_variance": relative_error(out["log_variance"][:, 0, 0, 0], want_log[t]),
                  "mean": relative_error(out["mean"], mean),
                  "loss": relative_error(losses["loss"], ((noise - eps) ** 2).mean(axis=(1, 2, 3)))}
        assert set(losses) == {"mse", "loss"}
        check(errors, 1e-5, var_type)


def test_ldm_schedule_and_q_sample(ldm_tiny):
    d = gd.create_diffusion("ldm", var_type="fixed_small")
    s = gd.ldm_ddim_schedule(d, 10, eta=1.0)
    np.testing.assert_array_equal(s.timesteps, ldm_tiny["ddim_timesteps"])
    errors = {"betas": relative_error(d.betas, ldm_tiny["betas"]),
              "alphas_cumprod": relative_error(d.alphas_cumprod, ldm_tiny["alphas_cumprod"]),
              "ddim_alphas": relative_error(s.alphas, ldm_tiny["ddim_alphas"]),
              "ddim_alphas_prev": relative_error(s.alphas_prev, ldm_tiny["ddim_alphas_prev"]),
              "ddim_sqrt_one_minus_alphas": relative_error(s.sqrt_one_minus_alphas,
                                                           ldm_tiny["ddim_sqrt_one_minus_alphas"]),
              "ddim_eta1_sigmas": relative_error(s.sigmas, ldm_tiny["ddim_eta1_sigmas"]),
              "train_x_noisy": relative_error(
                  gd.q_sample(d, jnp.asarray(nhwc(ldm_tiny["train_x0"])), jnp.asarray(ldm_tiny["t"]),
                              jnp.asarray(nhwc(ldm_tiny["train_noise"]))), nhwc(ldm_tiny["train_x_noisy"]))}
    assert not np.any(gd.ldm_ddim_schedule(d, 10, eta=0.0).sigmas)
    check(errors, 1e-6, "ldm_tiny schedule / q_sample")


def _numpy_ldm_ddim(x, num_steps, eta, noises):
    """LDM's DDIMSampler written out from its README formulas, float64, with the stand-in model."""
    ab32 = gd.ldm_betas().astype(np.float64)
    ab32 = np.cumprod(1 - ab32).astype(np.float32).astype(np.float64)
    ts = np.arange(0, 1000, 1000 // num_steps) + 1
    a, a_prev = ab32[ts], np.append(ab32[0], ab32[ts[:-1]])
    sig = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    xs, x0s = [x], [x]
    for i, idx in enumerate(range(num_steps - 1, -1, -1)):
        e = np.asarray(_stand_in_eps(x, np.full(x.shape[0], ts[idx]), np))
        pred = (x - np.sqrt(1 - a[idx]) * e) / np.sqrt(a[idx])
        x = np.sqrt(a_prev[idx]) * pred + np.sqrt(1 - a_prev[idx] - sig[idx] ** 2) * e + sig[idx] * noises[i]
        xs.append(x)
        x0s.append(pred)
    return np.stack(xs), np.stack(x0s)


def test_ldm_ddim_loop_against_numpy(ldm_tiny):
    d = gd.create_diffusion("ldm", var_type="fixed_small")
    x_T = nhwc(ldm_tiny["ddim_x_T"])
    noises = nhwc(ldm_tiny["ddim_eta1_noise"])
    errors = {}
    for eta in (0.0, 1.0):
        want_x, want_x0 = _numpy_ldm_ddim(x_T.astype(np.float64), 10, eta, noises * eta)
        x, trace = jax.jit(lambda z, n: gd.ldm_ddim_sample_loop(d, _stand_in_eps, z, 10, n, eta=eta,
                                                                return_intermediates=True))(x_T, noises)
        errors.update({f"eta {eta} x": relative_error(x, want_x[-1]),
                       f"eta {eta} x_inter": relative_error(trace["x_inter"], want_x),
                       f"eta {eta} pred_x0": relative_error(trace["pred_x0"], want_x0)})
    check(errors, 1e-5, "ldm DDIM vs numpy (stand-in model)")


def test_ldm_ddim_matches_release(ldm_tiny):
    """The release's CFG DDIM loop (scale 1.6, eta 0 and 1) with the LDM UNet; needs its loader."""
    from vqlc_jax.generators import OFFICIAL_LOADERS, load_official

    if OFFICIAL_LOADERS.get("ldm") is None:
        pytest.skip("no LDM loader registered yet (vqlc_jax.models.unet)")
    model, variables = load_official("ldm", ldm_tiny["pth"], **ldm_tiny["meta"]["config"]["params"]["unet_config"][
        "params"])
    apply = jax.jit(lambda x, t, y: model.apply(variables, x, t, y))
    d = gd.create_diffusion("ldm", var_type="fixed_small")
    eps = guided_model_fn(apply, jnp.asarray(ldm_tiny["ddim_labels"]), 1.6, null_label=NULL, eps_channels=8)
    x_T, noises = nhwc(ldm_tiny["ddim_x_T"]), nhwc(ldm_tiny["ddim_eta1_noise"])
    errors = {}
    for eta, prefix in ((0.0, "ddim"), (1.0, "ddim_eta1")):
        x, trace = gd.ldm_ddim_sample_loop(d, eps, x_T, 10, noises, eta=eta, return_intermediates=True)
        errors.update({f"{prefix}_sample": relative_error(x, nhwc(ldm_tiny[f"{prefix}_sample"])),
                       f"{prefix}_x_inter": relative_error(trace["x_inter"], nhwc(ldm_tiny[f"{prefix}_x_inter"]))})
        if eta == 0.0:
            errors["ddim_pred_x0"] = relative_error(trace["pred_x0"], nhwc(ldm_tiny["ddim_pred_x0"]))
    check(errors, 1e-4, "ldm_tiny DDIM")


def test_key_sampling_is_deterministic():
    d = gd.create_diffusion("dit", respacing="5", var_type="fixed_large")
    x = jnp.zeros((2, 2, 2, 3))
    run = jax.jit(lambda key: gd.p_sample_loop(d, _stand_in_eps, x, key))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    ddim = jax.jit(lambda key: gd.ddim_sample_loop(d, _stand_in_eps, x, key, eta=1.0))
    np.testing.assert_array_equal(ddim(jax.random.key(3)), ddim(jax.random.key(3)))


def test_bad_input_is_named():
    d = gd.create_diffusion("dit", respacing="5")
    x = jnp.zeros((2, 2, 2, 3))
    with pytest.raises(ValueError, match="cannot take 1001 steps"):
        gd.space_timesteps(1000, "1001")
    with pytest.raises(ValueError, match="'fast'"):
        gd.space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="got 0"):
        gd.create_diffusion("dit", num_steps=0)
    with pytest.raises(ValueError, match="'cosine'"):
        gd.create_diffusion("cosine")
    with pytest.raises(ValueError, match="var_type='learned'"):
        gd.create_diffusion("dit", var_type="learned")
    with pytest.raises(ValueError, match="needs 6"):
        gd.p_mean_variance(d, _stand_in_eps, x, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match=r"noises of shape \(5, 2, 2, 2, 3\)"):
        gd.p_sample_loop(d, lambda a, s: jnp.concatenate([a, a], -1), x, jnp.zeros((4, 2, 2, 2, 3)))
    with pytest.raises(ValueError, match="eta=-1"):
        gd.ddim_sample_loop(d, _stand_in_eps, x, eta=-1)
    with pytest.raises(ValueError, match="needs noise"):
        gd.ldm_ddim_sample_loop(gd.create_diffusion("ldm"), _stand_in_eps, x, 10, eta=1.0)
    with pytest.raises(ValueError, match="reach t=1000"):
        gd.ldm_ddim_schedule(gd.create_diffusion("ldm"), 3)
