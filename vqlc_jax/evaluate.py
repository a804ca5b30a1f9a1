"""Evaluate a tokenizer over a whole split: PSNR, SSIM, L1, LPIPS (when its weights are on disk), utilization.

Conventions: images are compared in [0, 1] after clipping the reconstruction; PSNR and SSIM per image, then
averaged (SSIM: 11-tap Gaussian, sigma 1.5, valid region, as skimage/dm-pix); utilization is the share of codes used
at least once over the split, with counts summed over all devices and hosts.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax import metrics, parallel
from vqlc_jax.models.vqgan import VQModel

GRID_IMAGES = 8


@dataclasses.dataclass
class EvalResult:
    scalars: dict[str, float]
    counts: np.ndarray  # per-code usage over the split, int64 [N]
    originals: np.ndarray  # the first GRID_IMAGES images, [n, H, W, C] in [0, 1]
    reconstructions: np.ndarray


def _batch_sums(model: VQModel, num_codes: int, lpips: tuple[Callable, Any] | None):
    """A jittable fn (variables, lpips_vars, images, mask) -> (per-metric sums over valid images, counts, recon)."""

    def fn(variables, lpips_vars, images, mask):
        recon, indices, aux = model.apply(variables, images)
        x, r = (images + 1) / 2, jnp.clip((recon + 1) / 2, 0, 1)
        per_image = {
            "psnr": metrics.psnr(x, r),
            "ssim": metrics.ssim(x, r),
            "l1": jnp.mean(jnp.abs(recon - images), axis=(1, 2, 3)),
        }
        if lpips is not None:
            per_image["lpips"] = lpips[0](lpips_vars, images, jnp.clip(recon, -1, 1))
        sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
        sums["quant_loss"] = aux["quant_loss"] * jnp.sum(mask)
        tokens_mask = jnp.broadcast_to(mask[:, None, None], indices.shape).reshape(-1)
        counts = jnp.bincount(indices.reshape(-1), weights=tokens_mask, length=num_codes)
        return sums, counts, r

    return fn


def evaluate_variables(model: VQModel, variables: Any, config: ml_collections.ConfigDict, *,
                       mesh: jax.sharding.Mesh, lpips: tuple[Callable, Any] | None = None) -> EvalResult:
    """Runs `model` over `config.data.eval_split` (at most `config.data.eval_max_images` images when > 0)."""
    from vqlc_jax import data as data_lib

    source = data_lib.make_source(config.data.name, config.data.eval_split, config.data.options)
    if config.data.eval_max_images:
        source = data_lib.Subset(source, config.data.eval_max_images)
    batch_size = config.get("eval_batch_size", config.global_batch_size)
    num_codes = config.model.quantizer.num_codes
    sharding = parallel.batch_sharding(mesh)
    step = jax.jit(_batch_sums(model, num_codes, lpips),
                   out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh), sharding))
    lpips_vars = lpips[1] if lpips else None
    totals: dict[str, float] = {}
    counts = np.zeros(num_codes, np.float64)
    n = 0
    originals, recons = [], []
    pipeline = data_lib.make_pipeline(
        source, resolution=config.data.resolution, global_batch_size=batch_size, seed=config.seed, train=False,
        process_index=jax.process_index(), process_count=jax.process_count())
    for batch in pipeline:
        images, mask = batch.image, batch.mask
        images_g, mask_g = parallel.global_batch(images, sharding), parallel.global_batch(mask, sharding)
        sums, batch_counts, r = step(variables, lpips_vars, images_g, mask_g.astype(jnp.float32))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        counts += np.asarray(jax.device_get(batch_counts), np.float64)
        n += int(jax.device_get(jnp.sum(mask_g)))
        if len(originals) < GRID_IMAGES and jax.process_index() == 0:
            keep = np.asarray(mask, bool)
            originals.extend(list(((images[keep] + 1) / 2)[: GRID_IMAGES - len(originals)]))
            recons.extend(list(parallel.local_rows(r)[keep][: GRID_IMAGES - len(recons)]))
    if n == 0:
        raise ValueError(f"evaluation split {config.data.eval_split!r} of {config.data.name!r} has no images")
    scalars = {k: v / n for k, v in totals.items()}
    counts = counts.round().astype(np.int64)
    scalars.update(utilization=float(metrics.utilization(counts)), perplexity=float(metrics.perplexity(counts)),
                   num_images=float(n))
    return EvalResult(scalars, counts, np.asarray(originals), np.asarray(recons))


def save_grid(originals: np.ndarray, reconstructions: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """Writes originals (top row) over reconstructions (bottom row) as a PNG; returns the grid, uint8 HWC."""
    from PIL import Image

    rows = [np.concatenate(list(images), axis=1) for images in (originals, reconstructions)]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)
    return grid
