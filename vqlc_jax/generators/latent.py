"""Diffusion families on the tokenizer's continuous latents (`config.generator = "dit"`; SiT and LDM build on the
same base): what they share is the data side.

Input: the encoded dataset's pre-quantization latents [h, w, D'], normalised per channel with the encode job's
statistics by default (`loss.latent_scale = "channel"`; `"none"` reproduces the release, which diffuses them
unscaled). Samples are un-normalised and decoded the release's way: nearest projected code, then `post_quant_conv`
and the decoder (`sample.quantize = False` decodes the latents directly); the nearest codes are also the token maps
whose generation utilization is counted. Labels are dropped to the null class with `loss.class_dropout` (0.1), so
that classifier-free guidance has a trained null class; guidance acts on every latent channel unless
`sample.cfg_channels = 3` (the release's SD-VAE habit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax.generators import diffusion
from vqlc_jax.generators.family import Family, check_size, drop_labels
from vqlc_jax.models.dit import DIT_SIZES, DiT, guided_model_fn

Array = jax.Array
LATENT_SCALES = ("channel", "none")


class LatentFamily(Family):
    """Normalisation, decoding and token counting of latent samples."""

    fields = ("latents",)

    def __init__(self, config: ml_collections.ConfigDict, dataset):
        self.config = config
        check_size(config, "num_classes", dataset.num_classes, str(getattr(dataset, "directory", "")) or "given")
        self.num_classes = int(dataset.num_classes)
        self.latent_shape = tuple(dataset.latent_shape)
        if config.loss.latent_scale == "channel":
            self.shift = np.asarray(dataset.latent_mean, np.float32)
            self.scale = np.asarray(dataset.latent_std, np.float32)
        else:
            self.shift = np.zeros(self.latent_shape[-1], np.float32)
            self.scale = np.ones(self.latent_shape[-1], np.float32)

    def init_params(self, rng):
        x = jnp.zeros((1, *self.latent_shape), jnp.float32)
        return self.model.init(rng, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]

    def normalize(self, latents: Array) -> Array:
        return (latents - self.shift) / self.scale

    def denormalize(self, x: Array) -> Array:
        return x * self.scale + self.shift

    def noise_level(self, t: Array) -> Array:
        """The sampler's time as a noise level in [0, 1] (1: pure noise), for the guidance interval."""
        return t.astype(jnp.float32) / (self.config.diffusion.num_steps - 1)

    def guided(self, apply, labels: Array, options: ml_collections.ConfigDict, out_channels_eps: int):
        """`model_fn(x, t)` for the samplers: conditional, or guided (cond and null rows in one batch) when
        `cfg_scale` > 1, on all eps channels or the first `cfg_channels`, at the noise levels inside
        `cfg_interval` (Kynkaanniemi et al., 2024; (0, 1): everywhere) and with scale 1 outside it."""
        if options.cfg_scale <= 1.0:
            return lambda x, t: apply(x, t, labels)
        lo, hi = options.cfg_interval
        scale = options.cfg_scale
        if (lo, hi) != (0.0, 1.0):
            def scale(t):
                level = self.noise_level(t)
                return jnp.where((level >= lo) & (level <= hi), options.cfg_scale, 1.0)
        return guided_model_fn(apply, labels, scale, null_label=self.num_classes, eps_channels=out_channels_eps,
                               channels=options.cfg_channels or None)

    def start(self, params, rng: Array, labels: Array, options: ml_collections.ConfigDict):
        """(x at the noisy end [B, h, w, D'], the sampler's model_fn, a key for the sampler's noise)."""
        k_x, k_noise = jax.random.split(rng)
        x = jax.random.normal(k_x, (labels.shape[0], *self.latent_shape), jnp.float32)
        model_fn = self.guided(lambda x, t, y: self.model.apply({"params": params}, x, t, y), labels, options,
                               self.latent_shape[-1])
        return x, model_fn, k_noise

    def decode(self, tokenizer, samples):
        return np.asarray(tokenizer.decode_latents(samples, quantize=self.config.sample.quantize))

    def samples_to_tokens(self, tokenizer, samples):
        return np.asarray(tokenizer.quantize_latents(samples))


def build_dit(config: ml_collections.ConfigDict, *, num_classes: int, latent_shape: tuple[int, ...]) -> DiT:
    m = config.model
    depth, width, heads = DIT_SIZES[m.size]
    depth, width, heads = m.depth or depth, m.hidden_size or width, m.num_heads or heads  # 0: the size's
    return DiT(input_size=latent_shape[0], hidden_size=width, depth=depth, num_heads=heads,
               patch_size=m.patch_size, in_channels=latent_shape[-1], num_classes=num_classes,
               learn_sigma=m.learn_sigma, dtype=jnp.dtype(m.dtype), remat=m.remat)


class DiTFamily(LatentFamily):
    """DiT (adaLN-Zero) with DiT's Gaussian diffusion: linear betas, eps prediction, learned-range variance and the
    hybrid loss; ancestral (`sample.sampler = "ddpm"`) or DDIM (`"ddim"`, `sample.eta`) sampling over
    `sample.steps` respaced steps."""

    def __init__(self, config: ml_collections.ConfigDict, dataset):
        super().__init__(config, dataset)
        self.model = build_dit(config, num_classes=self.num_classes, latent_shape=self.latent_shape)
        var_type = "learned_range" if config.model.learn_sigma else "fixed_small"
        self.diffusion = diffusion.create_diffusion("dit", config.diffusion.num_steps, var_type=var_type)

    def loss(self, params, batch, rng):
        x0 = self.normalize(batch["latents"])
        k_t, k_noise, k_label = jax.random.split(rng, 3)
        t = jax.random.randint(k_t, x0.shape[:1], 0, self.diffusion.num_timesteps)
        labels = drop_labels(k_label, batch["label"], rate=self.config.loss.class_dropout, null_label=self.num_classes)
        terms = diffusion.training_losses(
            self.diffusion, lambda x, s: self.model.apply({"params": params}, x, s, labels, train=True), x0, t,
            jax.random.normal(k_noise, x0.shape, x0.dtype))
        return jnp.mean(terms["loss"]), {name: jnp.mean(value) for name, value in terms.items()}

    def sample(self, params, rng, labels, options):
        d = diffusion.create_diffusion("dit", self.config.diffusion.num_steps, str(options.steps),
                                       var_type=self.diffusion.var_type)
        x_T, model_fn, k_noise = self.start(params, rng, labels, options)
        if options.sampler == "ddpm":
            x = diffusion.p_sample_loop(d, model_fn, x_T, k_noise)
        else:
            x = diffusion.ddim_sample_loop(d, model_fn, x_T, k_noise, eta=options.eta)
        return self.denormalize(x)


class SiTFamily(LatentFamily):
    """SiT: the DiT backbone without the sigma half, trained on SiT's transport (Linear or GVP path; velocity,
    score or noise prediction; loss weight) and sampled with its ODE (diffrax dopri5 with SiT's tolerances, or
    fixed Euler / Heun steps) or its Euler-Maruyama SDE (`sample.sampler = "ode" | "sde"`)."""

    def __init__(self, config: ml_collections.ConfigDict, dataset):
        from vqlc_jax.generators import transport

        super().__init__(config, dataset)
        self.model = build_dit(config, num_classes=self.num_classes, latent_shape=self.latent_shape)
        t = config.transport
        self.transport = transport.Transport(t.path, t.prediction, t.loss_weight or None)

    def noise_level(self, t: Array) -> Array:
        return 1.0 - t  # SiT's time runs from noise (0) to data (1)

    def loss(self, params, batch, rng):
        from vqlc_jax.generators import transport

        x1 = self.normalize(batch["latents"])
        k_t, k_label = jax.random.split(rng)
        t, x0 = transport.sample_t_x0(self.transport, k_t, x1)
        labels = drop_labels(k_label, batch["label"], rate=self.config.loss.class_dropout, null_label=self.num_classes)
        terms = transport.training_losses(
            self.transport, lambda x, s: self.model.apply({"params": params}, x, s, labels, train=True), x1, t, x0)
        loss = jnp.mean(terms["loss"])
        return loss, {"loss": loss}

    def sample(self, params, rng, labels, options):
        from vqlc_jax.generators import transport

        x0, model_fn, k_noise = self.start(params, rng, labels, options)
        if options.sampler == "ode":
            x = transport.sample_ode(self.transport, model_fn, x0, method=options.ode_method, num_steps=options.steps,
                                     atol=options.atol, rtol=options.rtol)
        else:
            x = transport.sample_sde(self.transport, model_fn, x0, k_noise, num_steps=options.steps,
                                     diffusion_form=options.diffusion_form, last_step=options.last_step or None)
        return self.denormalize(x)


class LDMFamily(LatentFamily):
    """LDM: the release's class-conditional UNet (cross-attention to a class embedding) with LDM's DDPM (sqrt-linear
    betas 0.0015..0.0195, eps prediction, L2) and LDM's DDIM (`sample.steps`, `sample.eta`)."""

    def __init__(self, config: ml_collections.ConfigDict, dataset):
        from vqlc_jax.models.unet import LDM_F8, LDM_F16, UNet

        super().__init__(config, dataset)
        m = config.model
        preset = {"f16": LDM_F16, "f8": LDM_F8}[m.preset]
        channels = self.latent_shape[-1]
        self.model = UNet(**{**preset, "in_channels": channels, "out_channels": channels,
                             "model_channels": m.model_channels or preset["model_channels"],
                             "num_classes": self.num_classes}, dtype=jnp.dtype(m.dtype), remat=m.remat)
        self.diffusion = diffusion.create_diffusion("ldm", config.diffusion.num_steps, var_type="fixed_small")

    loss = DiTFamily.loss  # with a fixed variance the terms are LDM's L2 (mse = loss)

    def sample(self, params, rng, labels, options):
        x_T, model_fn, k_noise = self.start(params, rng, labels, options)
        x = diffusion.ldm_ddim_sample_loop(self.diffusion, model_fn, x_T, options.steps, k_noise, eta=options.eta)
        return self.denormalize(x)
