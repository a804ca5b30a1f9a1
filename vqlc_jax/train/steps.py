"""The tokenizer's training step: autoencoder update, then (after `disc_start`) the PatchGAN update.

One backward pass serves the whole generator loss, the adaptive GAN weight included: the model runs up to the
decoder's last conv (`VQModel.features`), the last conv (`VQModel.head`) is differentiated on its own, and the
gradients of the reconstruction terms and of the GAN term with respect to the reconstruction are pulled back through
the last conv separately (cheap) to get the adaptive weight, then together through the network (once). The
discriminator update reuses the generator's reconstruction; before `disc_start` nothing is computed for the GAN.

A factorized (FQGAN) model adds its terms to the quantization losses pulled back through the network: the
disentanglement loss and, for each branch with a teacher, InfoNCE between its FeatPredHead's CLS output and the
frozen teacher's feature of the same images (`StepFns.teachers`, variables passed in like LPIPS's).
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
from vqlc_jax.models.teachers import Teacher
from vqlc_jax.models.vqgan import VQModel
from vqlc_jax.quantizers.utilization import joint_ids

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
    window_counts: Array  # code usage since the last log line, int32 [N] (sub-codebooks one after the other)
    epoch_counts: Array  # code usage in the current epoch, int32 [N]
    rng: Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the tokenizer losses (see configs: `loss.*`)."""

    reconstruction: str = "l1"
    reconstruction_weight: float = 1.0
    quant_weight: float = 1.0
    lpips_weight: float = 1.0
    disc_weight: float = 0.1  # multiplies the adaptive weight (or is the GAN weight without it)
    disc_factor: float = 1.0
    adaptive_weight: bool = True  # taming's adaptive GAN weight; False: a constant `disc_weight` (LlamaGen, FQGAN)
    adaptive_weight_max: float = 1e4
    disentangle_weight: float = 0.1  # FQGAN: squared cosine between sub-codes (factorized models only)
    semantic_weight: float = 0.5  # FQGAN: InfoNCE against each teacher (branches with a teacher only)


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The pure functions a step needs; `lpips` is None when the run trains without LPIPS."""

    model: VQModel
    discriminator: nn.Module
    optimizer: optax.GradientTransformation
    disc_optimizer: optax.GradientTransformation
    lpips: Callable[[PyTree, Array, Array], Array] | None
    loss: LossConfig
    teachers: tuple[tuple[str, Teacher], ...] = ()  # (branch, frozen teacher) of a factorized model
    codebook_sizes: tuple[int, ...] = ()  # of a factorized model's sub-codebooks (token counts are concatenated)


def _set_head(params: PyTree, head: PyTree) -> PyTree:
    return {**params, "decoder": {**params["decoder"], "conv_out": head}}


def _mutable(model_state: PyTree) -> list[str]:
    """Collections the forward pass updates in training (the EMA codebook); the frozen codebook is read-only."""
    return [name for name in model_state if name != "codebook"]


def _branch_terms(aux: PyTree, targets: dict[str, Array]) -> tuple[dict, dict]:
    """A factorized model's extra losses {name: unweighted scalar} (disentanglement, one InfoNCE per teacher) and
    its per-branch metrics (`<metric>_<branch>`)."""
    terms = {"disentangle_loss": aux["disentangle_loss"]}
    for name, target in targets.items():
        terms[f"semantic_loss_{name}"] = losses.info_nce_loss(aux["branches"][name]["semantic_feat"][:, 0], target)
    metrics = {f"{key}_{name}": branch[key] for name, branch in aux["branches"].items()
               for key in ("quant_loss", "codebook_loss", "commitment_loss", "entropy_loss") if key in branch}
    return terms, metrics


def _loss_weights(cfg: LossConfig, terms: dict) -> dict:
    """The weight of each loss pulled back through the network (the quantization loss, and a factorized model's)."""
    weights = {"quant_loss": cfg.quant_weight, "disentangle_loss": cfg.disentangle_weight}
    return {k: weights.get(k, cfg.semantic_weight) for k in terms}


def _code_counts(fns: StepFns, indices: Array, num_codes: int) -> Array:
    """Usage of each code in `indices`; a factorized model's [B, k, ...] tokens count per sub-codebook, in turn."""
    return jnp.bincount(joint_ids(indices, fns.codebook_sizes).reshape(-1), length=num_codes).astype(jnp.int32)


def train_step(fns: StepFns, state: TrainState, images: Array, lpips_vars: PyTree, *, use_gan: bool,
               teacher_vars: PyTree = None):
    """One optimisation step on a (sharded) batch of images in [-1, 1]; returns (new state, scalar metrics).
    `teacher_vars` {branch: variables} go with `fns.teachers` (frozen: no gradient, no update)."""
    cfg = fns.loss
    rng = jax.random.fold_in(state.rng, state.step)
    mutable = _mutable(state.model_state)
    targets = {name: teacher.features(teacher_vars[name], images) for name, teacher in fns.teachers}

    # ---- Forward to the decoder's last layer, keeping the pull-back. -------------------------------------------------
    def body(params):
        variables = {"params": params, **state.model_state}
        (h, indices, aux), updates = fns.model.apply(
            variables, images, train=True, method="features", mutable=mutable, rngs={"dropout": rng})
        terms, branch_metrics = _branch_terms(aux, targets) if fns.codebook_sizes else ({}, {})
        return (h, {"quant_loss": aux["quant_loss"], **terms}), (indices, updates, branch_metrics)

    (h, terms), body_vjp, (indices, model_updates, branch_metrics) = jax.vjp(body, state.params, has_aux=True)
    weights = _loss_weights(cfg, terms)

    def head(head_params, h):
        return fns.model.apply({"params": _set_head(state.params, head_params)}, h, method="head")

    recon, head_vjp = jax.vjp(head, state.params["decoder"]["conv_out"], h)

    # ---- Reconstruction terms (L1/L2 + LPIPS) and their gradient at the reconstruction. ------------------------------
    def nll_fn(x_rec):
        rec = losses.reconstruction_loss(images, x_rec, kind=cfg.reconstruction)
        perceptual = jnp.mean(fns.lpips(lpips_vars, images, x_rec)) if fns.lpips else jnp.zeros(())
        return cfg.reconstruction_weight * rec + cfg.lpips_weight * perceptual, (rec, perceptual)

    (nll, (rec_loss, lpips_loss)), g_nll = jax.value_and_grad(nll_fn, has_aux=True)(recon)
    metrics = {"rec_loss": rec_loss, "lpips": lpips_loss, **terms, **branch_metrics}

    # ---- GAN term with the adaptive weight, taken at the last layer. -------------------------------------------------
    disc_vars = {"params": state.disc_params, "batch_stats": state.disc_stats}
    if use_gan:
        def gan_fn(x_rec):
            logits, _ = fns.discriminator.apply(disc_vars, x_rec, train=True, mutable=["batch_stats"])
            return losses.generator_adversarial_loss(logits)

        g_loss, g_gan = jax.value_and_grad(gan_fn)(recon)
        d_weight = jnp.asarray(cfg.disc_weight, g_loss.dtype)
        if cfg.adaptive_weight:
            d_weight = d_weight * losses.adaptive_weight(
                head_vjp(g_nll)[0]["kernel"], head_vjp(g_gan)[0]["kernel"], max_weight=cfg.adaptive_weight_max)
        g_recon = g_nll + (d_weight * cfg.disc_factor) * g_gan
        metrics.update(g_loss=g_loss, d_weight=d_weight)
    else:
        g_loss = d_weight = jnp.zeros(())
        g_recon = g_nll

    # ---- One backward pass through the network. ----------------------------------------------------------------------
    g_head, g_h = head_vjp(g_recon)
    (grads,) = body_vjp((g_h, {k: jnp.asarray(w, terms[k].dtype) for k, w in weights.items()}))
    grads = _set_head(grads, jax.tree.map(jnp.add, grads["decoder"]["conv_out"], g_head))
    updates, opt_state = fns.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["loss"] = nll + d_weight * cfg.disc_factor * g_loss + sum(w * terms[k] for k, w in weights.items())

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

    counts = _code_counts(fns, indices, state.window_counts.shape[0])
    new_state = state.replace(
        step=state.step + 1, params=params, model_state={**state.model_state, **model_updates}, opt_state=opt_state,
        disc_params=disc_params, disc_stats=disc_stats, disc_opt_state=disc_opt_state,
        window_counts=state.window_counts + counts, epoch_counts=state.epoch_counts + counts)
    return new_state, metrics
