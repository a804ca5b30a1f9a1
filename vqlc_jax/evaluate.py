"""Evaluate a tokenizer over a whole split: PSNR, SSIM, L1, LPIPS and rFID (when their weights are on disk), and
codebook utilization.

    python -m vqlc_jax.evaluate --tokenizer DIR --config configs/eval/demo.py [--output DIR]
    python -m vqlc_jax.evaluate --workdir TRAIN_WORKDIR --config configs/eval/demo.py   # uses TRAIN_WORKDIR/tokenizer

Conventions (written into eval.json): images compared in [0, 1] after clipping the reconstruction; PSNR (RGB, and
on the BT.601 Y channel as the paper) and SSIM (11-tap Gaussian, sigma 1.5, valid region, as skimage/dm-pix) per
image, then averaged; LPIPS (VGG16, v0.1 heads) on [-1, 1] inputs; rFID from pytorch-fid's Inception pool features
of reconstructions vs originals (bilinear resize to 299); utilization = share of codes used at least once over the
split, counts summed over all devices and hosts. A metric whose weights are not on disk is reported unavailable
with the reason, never computed with random weights.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax import metrics, parallel
from vqlc_jax.models.vqgan import VQModel
from vqlc_jax.quantizers.utilization import joint_ids, split_counts

GRID_IMAGES = 8
CONVENTIONS = {
    "range": "images in [0, 1]; reconstructions clipped",
    "psnr": "RGB, data range 1, per image then mean",
    "psnr_y": "BT.601 Y channel (16 + 65.481 R + 128.553 G + 24.966 B) / 255, per image then mean",
    "ssim": "11-tap Gaussian window, sigma 1.5, k1 0.01, k2 0.03, population variance, valid region, mean over "
            "channels, per image then mean",
    "lpips": "VGG16 + lpips v0.1 heads, inputs in [-1, 1], per image then mean",
    "rfid": "pytorch-fid InceptionV3 pool3 (bilinear resize to 299), reconstructions vs originals of the split",
    "utilization": "share of codes used at least once over the split",
}
Model = tuple[Callable, Any]  # (apply fn, variables)


@dataclasses.dataclass
class EvalResult:
    scalars: dict[str, float]
    unavailable: dict[str, str]  # metric -> reason
    counts: np.ndarray  # per-code usage over the split, int64 [N]
    originals: np.ndarray  # the first GRID_IMAGES images, [n, H, W, C] in [0, 1]
    reconstructions: np.ndarray


def _batch_fn(model: VQModel, sizes: tuple[int, ...], lpips: Model | None, fid: Model | None):
    """(variables, lpips_vars, fid_vars, images, mask) -> (masked per-metric sums, code counts, recon, features).

    With k > 1 sub-codebooks (tokens [B, k, h, w]) the counts are those of each codebook, one after the other."""

    def fn(variables, lpips_vars, fid_vars, images, mask):
        recon, indices, aux = model.apply(variables, images)
        x, r = (images + 1) / 2, jnp.clip((recon + 1) / 2, 0, 1)
        per_image = {
            "psnr": metrics.psnr(x, r),
            "psnr_y": metrics.psnr_y(x, r),
            "ssim": metrics.ssim(x, r),
            "l1": jnp.mean(jnp.abs(jnp.clip(recon, -1, 1) - images), axis=(1, 2, 3)),
        }
        if lpips is not None:
            per_image["lpips"] = lpips[0](lpips_vars, images, 2 * r - 1)
        sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
        sums["quant_loss"] = aux["quant_loss"] * jnp.sum(mask)
        indices = joint_ids(indices, sizes)
        token_weights = jnp.broadcast_to(mask.reshape(-1, *(1,) * (indices.ndim - 1)), indices.shape).reshape(-1)
        counts = jnp.bincount(indices.reshape(-1), weights=token_weights, length=sum(sizes))
        features = (fid[0](fid_vars, x), fid[0](fid_vars, r)) if fid is not None else None
        return sums, counts, r, features

    return fn


def evaluate_tokenizer(model: VQModel, variables: Any, data: ml_collections.ConfigDict, *,
                       num_codes: int | Sequence[int], batch_size: int, mesh: jax.sharding.Mesh,
                       lpips: Model | None = None, fid: Model | None = None,
                       unavailable: dict[str, str] | None = None, codebook_names: Sequence[str] = ()) -> EvalResult:
    """Runs `model` over `data.eval_split` of `data.name` (at most `data.eval_max_images` images when > 0).

    A factorized tokenizer passes its `codebook_sizes` as `num_codes` and its `codebook_names`: utilization and
    perplexity are then also reported per sub-codebook (`utilization_<name>`, `perplexity_<name>`), the plain keys
    over all codes together; `counts` holds the sub-codebooks' counts one after the other."""
    from vqlc_jax import data as data_lib

    sizes = (num_codes,) if isinstance(num_codes, int) else tuple(int(n) for n in num_codes)
    source = data_lib.make_source(data.name, data.eval_split, data.options)
    if data.eval_max_images:
        source = data_lib.Subset(source, data.eval_max_images)
    sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    step = jax.jit(_batch_fn(model, sizes, lpips, fid),
                   out_shardings=(replicated, replicated, sharding, sharding if fid else None))
    totals: dict[str, float] = {}
    counts = np.zeros(sum(sizes), np.float64)
    stats = (metrics.FeatureStats.zeros(2048), metrics.FeatureStats.zeros(2048)) if fid else None
    n = 0
    originals, recons = [], []
    pipeline = data_lib.make_pipeline(source, resolution=data.resolution, global_batch_size=batch_size, seed=0,
                                      train=False, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    for batch in pipeline:
        keep = np.asarray(batch.mask, bool)
        images = parallel.global_batch(batch.image, sharding)
        mask = parallel.global_batch(keep.astype(np.float32), sharding)
        sums, batch_counts, r, features = step(variables, lpips and lpips[1], fid and fid[1], images, mask)
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        counts += np.asarray(jax.device_get(batch_counts), np.float64)
        n += int(jax.device_get(jnp.sum(mask)))
        if stats:  # each process accumulates its own rows; merged below
            for s, f in zip(stats, features):
                s.update(parallel.local_rows(f)[keep])
        if len(originals) < GRID_IMAGES and jax.process_index() == 0:
            originals.extend(list(((batch.image[keep] + 1) / 2)[: GRID_IMAGES - len(originals)]))
            recons.extend(list(parallel.local_rows(r)[keep][: GRID_IMAGES - len(recons)]))
    if n == 0:
        raise ValueError(f"evaluation split {data.eval_split!r} of data source {data.name!r} has no images")
    scalars = {k: v / n for k, v in totals.items()}
    counts = counts.round().astype(np.int64)
    scalars.update(utilization=float(metrics.utilization(counts)), perplexity=float(metrics.perplexity(counts)),
                   num_images=float(n))
    if len(sizes) > 1:
        for name, part in zip(codebook_names or map(str, range(len(sizes))), split_counts(counts, sizes)):
            scalars[f"utilization_{name}"] = float(metrics.utilization(part))
            scalars[f"perplexity_{name}"] = float(metrics.perplexity(part))
    if stats:
        real, fake = (merge_over_processes(s) for s in stats)
        scalars["rfid"] = metrics.frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    return EvalResult(scalars, dict(unavailable or {}), counts, np.asarray(originals), np.asarray(recons))


def _allgather(tree: Any) -> Any:
    """`process_allgather` of host arrays, stacked over processes on a new axis 0, keeping 64-bit dtypes exact
    (without x64, JAX would carry them as 32 bits: they travel as uint32 words). Same shapes on every process."""
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.ascontiguousarray(np.atleast_1d(leaf)) for leaf in leaves]
    words = [a.view(np.uint32) if a.dtype.itemsize == 8 else a for a in arrays]
    gathered = multihost_utils.process_allgather(words)
    return jax.tree.unflatten(treedef, [np.ascontiguousarray(g).view(a.dtype).reshape(len(g), *np.shape(leaf))
                                        for g, a, leaf in zip(gathered, arrays, leaves)])


def sum_over_processes(tree: Any) -> Any:
    """Elementwise sums over processes of a tree of host arrays (the same shapes on every process)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: x.sum(axis=0), _allgather(tree))


def concat_over_processes(rows: np.ndarray) -> np.ndarray:
    """Every process's rows [n_p, ...] (n_p may differ), concatenated in process order."""
    if jax.process_count() == 1:
        return rows
    counts = _allgather(np.int64(len(rows)))
    padded = np.zeros((counts.max(), *rows.shape[1:]), rows.dtype)
    padded[:len(rows)] = rows
    return np.concatenate([part[:n] for part, n in zip(_allgather(padded), counts)])


def merge_over_processes(stats: metrics.FeatureStats) -> metrics.FeatureStats:
    """The union of every process's feature statistics."""
    total = sum_over_processes({"n": np.int64(stats.n), "total": stats.total, "outer": stats.outer})
    return metrics.FeatureStats(int(total["n"]), total["total"], total["outer"])


def load_metric_models(lpips_path: str, fid_path: str) -> tuple[Model | None, Model | None, dict[str, str]]:
    """LPIPS and Inception (apply fn, variables) where their weights are on disk; reasons for the others."""
    found, unavailable = {}, {}
    for name, loaded in (("lpips", metrics.load_lpips_model(lpips_path or None)),
                         ("rfid", metrics.load_fid_model(fid_path or None))):
        if isinstance(loaded, metrics.Unavailable):
            unavailable[name] = loaded.reason
        else:
            module, variables = loaded
            found[name] = (module.apply, variables)
    return found.get("lpips"), found.get("rfid"), unavailable


def enlarge(images: np.ndarray, min_side: int = 64) -> np.ndarray:
    """Images [..., H, W, C] repeated pixel by pixel (nearest neighbour) so that H >= `min_side`: small crops stay
    visible in a grid."""
    scale = max(1, -(-min_side // images.shape[-3]))
    return images.repeat(scale, axis=-3).repeat(scale, axis=-2)


def with_caption(grid: np.ndarray, text: str, height: int = 14) -> np.ndarray:
    """The uint8 HWC `grid` under a white strip holding `text`."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (grid.shape[1], height), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), text, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), grid], axis=0)


def save_grid(originals: np.ndarray, reconstructions: np.ndarray, path: pathlib.Path, caption: str = "") -> np.ndarray:
    """Writes originals (top row) over reconstructions (bottom row), enlarged to at least 64 px and under a
    `caption` line, as a PNG; returns the grid, uint8 HWC."""
    from PIL import Image

    rows = [np.concatenate(list(enlarge((np.clip(images, 0, 1) * 255).round().astype(np.uint8))), axis=1)
            for images in (originals, reconstructions)]
    grid = np.concatenate(rows, axis=0)
    if caption:
        grid = with_caption(grid, caption)
    Image.fromarray(grid).save(path)
    return grid


def grid_caption(scalars: dict[str, float]) -> str:
    """One line of the reconstruction metrics for a grid."""
    parts = [f"PSNR {scalars['psnr']:.2f}", f"SSIM {scalars['ssim']:.4f}",
             f"utilization {100 * scalars['utilization']:.1f}%"]
    if "lpips" in scalars:
        parts.append(f"LPIPS {scalars['lpips']:.4f}")
    return ", ".join(parts)


def markdown_table(result: EvalResult, name: str) -> str:
    """The paper's columns as one Markdown table row (unavailable metrics marked n/a)."""
    s = result.scalars
    cols = [("images", f"{int(s['num_images'])}"), ("utilization %", f"{100 * s['utilization']:.2f}"),
            ("perplexity", f"{s['perplexity']:.1f}"), ("PSNR", f"{s['psnr']:.2f}"), ("PSNR-Y", f"{s['psnr_y']:.2f}"),
            ("SSIM", f"{s['ssim']:.4f}"), ("LPIPS", f"{s['lpips']:.4f}" if "lpips" in s else "n/a"),
            ("rFID", f"{s['rfid']:.2f}" if "rfid" in s else "n/a")]
    lines = ["| tokenizer | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {name} | " + " | ".join(v for _, v in cols) + " |"]
    lines += [f"\n{metric} unavailable: {reason}" for metric, reason in result.unavailable.items()]
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, output: pathlib.Path, *, name: str, extra: dict | None = None) -> dict:
    """eval.json (metrics, conventions, versions), eval.md, grid.png and code_counts.npy under `output`."""
    output.mkdir(parents=True, exist_ok=True)
    report = {"tokenizer": name, "metrics": result.scalars,
              "unavailable": result.unavailable, "conventions": CONVENTIONS,
              "versions": {"jax": jax.__version__, "python": platform.python_version(),
                           "backend": jax.default_backend(), "devices": jax.device_count()},
              **(extra or {})}
    (output / "eval.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    (output / "eval.md").write_text(markdown_table(result, name))
    np.save(output / "code_counts.npy", result.counts)
    save_grid(result.originals, result.reconstructions, output / "grid.png",
              caption=f"{name}: {grid_caption(result.scalars)}")
    return report


def main(argv):
    from absl import flags, logging

    from vqlc_jax.tokenizer import Tokenizer

    del argv
    f = flags.FLAGS
    directory = pathlib.Path(f.tokenizer or pathlib.Path(f.workdir or "") / "tokenizer")
    if not (f.tokenizer or f.workdir):
        raise ValueError("pass --tokenizer DIR (a Tokenizer.save directory) or --workdir DIR (a training workdir)")
    config = f.config
    tok = Tokenizer.load(directory)
    lpips, fid, unavailable = load_metric_models(config.lpips_path, config.fid_path)
    for metric, reason in unavailable.items():
        logging.warning("%s unavailable: %s", metric, reason)
    mesh = parallel.make_mesh()
    variables = jax.device_put(tok.variables, parallel.replicated(mesh))
    result = evaluate_tokenizer(tok.model, variables, config.data, num_codes=tok.codebook_sizes,
                                batch_size=config.batch_size, mesh=mesh, lpips=lpips, fid=fid,
                                unavailable=unavailable, codebook_names=tok.codebook_names)
    output = pathlib.Path(f.output or directory / "eval")
    if jax.process_index() == 0:
        write_report(result, output, name=str(directory), extra={"data": config.data.to_dict()})
        print(markdown_table(result, directory.name))
        logging.info("Wrote %s", output)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Evaluation config (configs/eval/*.py).", lock_config=True)
    flags.DEFINE_string("tokenizer", None, "A directory written by Tokenizer.save.")
    flags.DEFINE_string("workdir", None, "A training workdir (its tokenizer/ is evaluated).")
    flags.DEFINE_string("output", None, "Where to write the report (default: TOKENIZER/eval).")
    flags.mark_flag_as_required("config")
    app.run(main)
