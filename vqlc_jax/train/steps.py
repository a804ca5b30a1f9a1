"""The tokenizer's training step: autoencoder update, then (after `disc_start`) the PatchGAN update.

One backward pass serves the whole generator loss, the adaptive GAN weight included: the model runs up to the
decoder's last conv (`VQModel.features`), the last conv (`VQModel.head`) is differentiated on its own, and the
gradients of the reconstruction terms and of the GAN term with respect to the reconstruction are pulled back through
the last conv separately (cheap) to get the adaptive weight, then together through the network (once). The
discriminator update reuses the generator's reconstruction; before `disc_start` nothing is computed for the GAN.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqlc_jax import losses
from vqlc_jax.models.vqgan import VQModel

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints)."""

    step: Array
    params: PyTree  # trainable autoencoder parameters (projector, not the frozen codebook, for `lc`)
    model_state: PyTree  # non-trainable autoencoder collections: `codebook` (lc), `ema_state` (ema)
    opt_state: PyTree
    disc_params: PyTree
    disc_stats: PyTree  # discriminator BatchNorm running statistics
    disc_opt_state: PyTree
    window_counts: Array  # code usage since the last log line, int32 [N]
    epoch_counts: Array  # code usage in the current epoch, int32 [N]
    rng: Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the tokenizer losses (see configs: `loss.*`)."""

    reconstruction: str = "l1"
    reconstruction_weight: float = 1.0
    quant_weight: float = 1.0
    lpips_weight: float = 1.0
    disc_weight: float = 0.1  # multiplies the adaptive weight
    disc_factor: float = 1.0
    adaptive_weight_max: float = 1e4


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The pure functions a step needs; `lpips` is None when the run trains without LPIPS."""

    model: VQModel
    discriminator: nn.Module
    optimizer: optax.GradientTransformation
    disc_optimizer: optax.GradientTransformation
    lpips: Callable[[PyTree, Array, Array], Array] | None
    loss: LossConfig


def _set_head(params: PyTree, head: PyTree) -> PyTree:
    return {**params, "decoder": {**params["decoder"], "conv_out": head}}


def _mutable(model_state: PyTree) -> list[str]:
    """Collections the forward pass updates in training (the EMA codebook); the frozen codebook is read-only."""
    return [name for name in model_state if name != "codebook"]


def train_step(fns: StepFns, state: TrainState, images: Array, lpips_vars: PyTree, *, use_gan: bool):
    """One optimisation step on a (sharded) batch of images in [-1, 1]; returns (new state, scalar metrics)."""
    cfg = fns.loss
    rng = jax.random.fold_in(state.rng, state.step)
    mutable = _mutable(state.model_state)

    # ---- Forward to the decoder's last layer, keeping the pull-back. -------------------------------------------------
    def body(params):
        variables = {"params": params, **state.model_state}
        (h, indices, aux), updates = fns.model.apply(
            variables, images, train=True, method=VQModel.features, mutable=mutable, rngs={"dropout": rng})
        return (h, aux["quant_loss"]), (indices, updates)

    (h, quant_loss), body_vjp, (indices, model_updates) = jax.vjp(body, state.params, has_aux=True)

    def head(head_params, h):
        return fns.model.apply({"params": _set_head(state.params, head_params)}, h, method=VQModel.head)

    recon, head_vjp = jax.vjp(head, state.params["decoder"]["conv_out"], h)

    # ---- Reconstruction terms (L1/L2 + LPIPS) and their gradient at the reconstruction. ------------------------------
    def nll_fn(x_rec):
        rec = losses.reconstruction_loss(images, x_rec, kind=cfg.reconstruction)
        perceptual = jnp.mean(fns.lpips(lpips_vars, images, x_rec)) if fns.lpips else jnp.zeros(())
        return cfg.reconstruction_weight * rec + cfg.lpips_weight * perceptual, (rec, perceptual)

    (nll, (rec_loss, lpips_loss)), g_nll = jax.value_and_grad(nll_fn, has_aux=True)(recon)
    metrics = {"rec_loss": rec_loss, "lpips": lpips_loss, "quant_loss": quant_loss}

    # ---- GAN term with the adaptive weight, taken at the last layer. -------------------------------------------------
    disc_vars = {"params": state.disc_params, "batch_stats": state.disc_stats}
    if use_gan:
        def gan_fn(x_rec):
            logits, _ = fns.discriminator.apply(disc_vars, x_rec, train=True, mutable=["batch_stats"])
            return losses.generator_adversarial_loss(logits)

        g_loss, g_gan = jax.value_and_grad(gan_fn)(recon)
        d_weight = cfg.disc_weight * losses.adaptive_weight(
            head_vjp(g_nll)[0]["kernel"], head_vjp(g_gan)[0]["kernel"], max_weight=cfg.adaptive_weight_max)
        g_recon = g_nll + (d_weight * cfg.disc_factor) * g_gan
        metrics.update(g_loss=g_loss, d_weight=d_weight)
    else:
        g_loss = d_weight = jnp.zeros(())
        g_recon = g_nll

    # ---- One backward pass through the network. ----------------------------------------------------------------------
    g_head, g_h = head_vjp(g_recon)
    (grads,) = body_vjp((g_h, jnp.asarray(cfg.quant_weight, quant_loss.dtype)))
    grads = _set_head(grads, jax.tree.map(jnp.add, grads["decoder"]["conv_out"], g_head))
    updates, opt_state = fns.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["loss"] = nll + d_weight * cfg.disc_factor * g_loss + cfg.quant_weight * quant_loss

    # ---- Discriminator update on the same reconstruction. ------------------------------------------------------------
    disc_params, disc_stats, disc_opt_state = state.disc_params, state.disc_stats, state.disc_opt_state
    if use_gan:
        fake = jax.lax.stop_gradient(recon)

        def d_loss_fn(dp):
            real_logits, upd = fns.discriminator.apply(
                {"params": dp, "batch_stats": state.disc_stats}, images, train=True, mutable=["batch_stats"])
            fake_logits, upd = fns.discriminator.apply(
                {"params": dp, "batch_stats": upd["batch_stats"]}, fake, train=True, mutable=["batch_stats"])
            d_loss = cfg.disc_factor * losses.hinge_discriminator_loss(real_logits, fake_logits)
            return d_loss, (upd["batch_stats"], jnp.mean(real_logits), jnp.mean(fake_logits))

        (d_loss, (disc_stats, real_mean, fake_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
            state.disc_params)
        d_updates, disc_opt_state = fns.disc_optimizer.update(d_grads, state.disc_opt_state, state.disc_params)
        disc_params = optax.apply_updates(state.disc_params, d_updates)
        metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean)

    counts = jnp.bincount(indices.reshape(-1), length=state.window_counts.shape[0]).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, model_state={**state.model_state, **model_updates}, opt_state=opt_state,
        disc_params=disc_params, disc_stats=disc_stats, disc_opt_state=disc_opt_state,
        window_counts=state.window_counts + counts, epoch_counts=state.epoch_counts + counts)
    return new_state, metrics
