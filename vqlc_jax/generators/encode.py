"""Encode a dataset split once with a trained tokenizer: token maps, pre-quantization latents and labels in shards.

    python -m vqlc_jax.generators.encode --tokenizer DIR --config configs/encode/<name>.py --workdir OUT

Writes into OUT, per shard of `encode.images_per_shard` source images (split order, unreadable images left out and
counted): `tokens-SSSSS-of-NNNNN.npy` int32 [n, h, w] ([n, k, h, w] for a tokenizer of k sub-codebooks, e.g.
FQGAN's visual and semantic ones), `latents-...` float16 [n, h, w, D'] (`quant_conv(encoder(x))`,
what LDM, DiT and SiT diffuse), `labels-...` int32 [n] and, with `encode.flip`, `tokens_flip-...` and
`latents_flip-...` of the horizontally flipped images. `manifest.json` holds the tokenizer (directory, num_codes
(the largest sub-codebook's), num_codebooks, codebook_sizes, embed_dim (the latents' channels, k * D' for FQGAN),
downsample factor, resolution, quantizer, its whole config and a digest of its weights), the split (with
num_classes), the shapes, the shards (files with size and sha256) and, once complete, the per-channel latent
`latent_mean` / `latent_std` over every written latent (flips included), accumulated in float64 per shard and
combined. `vqlc_jax.data.encoded.open_encoded(OUT)` reads it for the generator trainers.

Images come from the evaluation pipeline at `data.resolution` (centre crops); the resolution must be the
tokenizer's. Sharding over devices and hosts, atomic writes, resume (intact shards kept, others redone; a folder
written with another tokenizer, split or option is refused, naming the keys) and progress with images/s and ETA
are `vqlc_jax.data.shards`, shared with the codebook feature extraction.
Multi-host: JAX detects TPU pods and SLURM; otherwise pass --coordinator_address, --num_processes, --process_id.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax import data as data_lib
from vqlc_jax.data import shards as shards_lib
from vqlc_jax.data.encoded import FORMAT, LATENT_DTYPE, encoded_job
from vqlc_jax.models.vqgan import VQModel
from vqlc_jax.tokenizer import CONFIG_FILE, Tokenizer


def base_config() -> ml_collections.ConfigDict:
    """Every key of an encode config with its default: ImageNet train at 256 px, no flips (the VQGAN-LC release)."""
    c = ml_collections.ConfigDict()
    # The split to encode: `vqlc_jax.data.make_source(name, split, options)`, at most max_images (0: all), centre
    # crops at `resolution` (the tokenizer's).
    c.data = dict(name="imagenet2012", split="train", options={}, resolution=256, max_images=0)
    # flip: also encode each image flipped left-right. num_devices: 0 = all (only a single-process run may use
    # fewer); num_workers: decoding threads (0: Python's default).
    c.encode = dict(flip=False, global_batch_size=256, images_per_shard=10_240, num_devices=0, num_workers=0)
    return c


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {why}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key of `data` or `encode` whose value cannot work."""
    d, e = config.data, config.encode
    _require(d.name in data_lib.SOURCES, "data.name", d.name, f"choices: {', '.join(data_lib.SOURCES)}")
    _require(d.resolution > 0, "data.resolution", d.resolution, "must be positive")
    _require(d.max_images >= 0, "data.max_images", d.max_images, "must be >= 0 (0: the whole split)")
    _require(e.global_batch_size > 0, "encode.global_batch_size", e.global_batch_size, "must be positive")
    _require(e.images_per_shard > 0 and e.images_per_shard % e.global_batch_size == 0, "encode.images_per_shard",
             e.images_per_shard, f"must be a positive multiple of encode.global_batch_size={e.global_batch_size}")
    _require(e.num_devices >= 0, "encode.num_devices", e.num_devices, "must be >= 0 (0: all devices)")
    _require(e.num_devices == 0 or jax.process_count() == 1, "encode.num_devices", e.num_devices,
             "a multi-process run uses all devices (0)")
    _require(e.num_workers >= 0, "encode.num_workers", e.num_workers, "must be >= 0 (0: Python's default)")


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the manifest records of a tokenizer's configuration."""
    config = tokenizer.config.to_dict()
    sizes = [int(n) for n in tokenizer.codebook_sizes]  # one per sub-codebook (FQGAN), in token order
    return {"num_codes": max(sizes), "num_codebooks": len(sizes), "codebook_sizes": sizes,
            "embed_dim": tokenizer.latent_dim,
            "downsample": tokenizer.downsample_factor, "resolution": int(config["ddconfig"].get("resolution", 256)),
            "quantizer": config["quantizer"]["name"], "config": config}


def variables_digest(variables: Any) -> str:
    """sha256 over every variable's path, dtype, shape and bytes (in path order): the weights' identity."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def check_tokenizer(info: dict[str, Any], directory: pathlib.Path, resolution: int) -> None:
    """The tokenizer must work at the split's resolution: its own, a multiple of its down-sampling factor."""
    where = directory / CONFIG_FILE
    if resolution % info["downsample"]:
        raise ValueError(f"config.data.resolution={resolution} is not divisible by the down-sampling factor "
                         f"{info['downsample']} of the tokenizer in {where}")
    if resolution != info["resolution"]:
        raise ValueError(f"config.data.resolution={resolution} does not match the tokenizer's ddconfig.resolution="
                         f"{info['resolution']} in {where}: encode at the resolution it was trained at")


def _tokens_and_latents(model: VQModel, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(token indices [B, h, w] or [B, k, h, w] (FQGAN), pre-quantization latents [B, h, w, D'])."""
    z = model.encode(images)
    return model.quantizer(z)[1], z


def make_apply(tokenizer: Tokenizer, flip: bool):
    """`apply(variables, images)` -> {tokens int32, latents float16[, tokens_flip, latents_flip]}: one forward
    over the images (and their mirror images, stacked in one batch)."""
    def apply(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
        batch = jnp.concatenate([images, images[:, :, ::-1]]) if flip else images
        tokens, latents = tokenizer.model.apply(variables, batch, method=_tokens_and_latents)
        tokens, latents = tokens.astype(jnp.int32), latents.astype(LATENT_DTYPE)
        if not flip:
            return {"tokens": tokens, "latents": latents}
        n = images.shape[0]
        return {"tokens": tokens[:n], "latents": latents[:n], "tokens_flip": tokens[n:], "latents_flip": latents[n:]}

    return apply


def _run_header(config: ml_collections.ConfigDict, tokenizer: Tokenizer, directory: pathlib.Path,
                source: data_lib.Source) -> dict:
    d, e = config.data, config.encode
    info = tokenizer_info(tokenizer)
    check_tokenizer(info, directory, d.resolution)
    side = d.resolution // info["downsample"]
    return {
        "format": FORMAT,
        "tokenizer": info,
        "tokenizer_dir": str(directory),
        "tokenizer_digest": variables_digest(tokenizer.variables),
        "dataset": shards_lib.dataset_info(d, source),
        "preprocessing": shards_lib.PREPROCESSING,
        "flip": bool(e.flip),
        "token_shape": [side, side] if info["num_codebooks"] == 1 else [info["num_codebooks"], side, side],
        "latent_shape": [side, side, info["embed_dim"]],
        "latent_dtype": LATENT_DTYPE,
        "images_per_shard": e.images_per_shard,
        "num_shards": math.ceil(len(source) / e.images_per_shard),
    }


def _latent_moments(latents: list[np.ndarray]) -> dict[str, Any]:
    """{count, mean, m2} per channel of the written latents, in float64 (m2: the summed squared deviations)."""
    values = np.concatenate([x.reshape(-1, x.shape[-1]) for x in latents]).astype(np.float64)
    if not len(values):  # every image of the shard was unreadable
        return {"count": 0, "mean": [0.0] * values.shape[1], "m2": [0.0] * values.shape[1]}
    mean = values.mean(axis=0)
    return {"count": len(values), "mean": mean.tolist(), "m2": ((values - mean) ** 2).sum(axis=0).tolist()}


def latent_stats(shards: list[dict]) -> dict[str, list[float]]:
    """Per-channel `latent_mean` and `latent_std` (population) over all shards, combining their float64 moments
    pairwise (Chan, Golub and LeVeque)."""
    count, mean, m2 = 0, 0.0, 0.0
    for moments in (shard["latent_moments"] for shard in shards):
        n = moments["count"]
        if not n:
            continue
        delta, total = np.asarray(moments["mean"]) - mean, count + n
        mean = mean + delta * n / total
        m2 = m2 + np.asarray(moments["m2"]) + delta ** 2 * count * n / total
        count = total
    if not count:
        raise ValueError("no latents were written: every image of the split was unreadable")
    return {"latent_mean": mean.tolist(), "latent_std": np.sqrt(m2 / count).tolist()}


def _write_shard(directory: pathlib.Path, index: int, count: int, arrays: dict[str, np.ndarray]) -> dict:
    """Writes shard `index` of `count` (the kept images' outputs); returns its manifest entry's files and moments.
    Raises naming the shard when float16 latents overflowed (nothing of it is written)."""
    latents = [arrays[name] for name in ("latents", "latents_flip") if name in arrays]
    if not all(np.isfinite(x).all() for x in latents):
        raise ValueError(f"encoded shard {index} of {count} in {directory}: the tokenizer's latents overflow "
                         f"{LATENT_DTYPE} (|z| > {float(np.finfo(LATENT_DTYPE).max):g}) or are NaN")
    files = {"labels" if name == "label" else name: array for name, array in arrays.items()}
    return {**shards_lib.save_shard_arrays(directory, index, count, files), "latent_moments": _latent_moments(latents)}


def encode_dataset(config: ml_collections.ConfigDict, tokenizer_dir: str | os.PathLike,
                   workdir: str | os.PathLike) -> dict:
    """Encodes (or finishes encoding) `config`'s split with the tokenizer in `tokenizer_dir` into `workdir`
    (module docstring); returns the manifest."""
    check_config(config)
    tokenizer_dir = pathlib.Path(tokenizer_dir).absolute()
    tokenizer = Tokenizer.load(tokenizer_dir)
    source = shards_lib.split_source(config.data)
    header = _run_header(config, tokenizer, tokenizer_dir, source)
    e = config.encode
    compute = shards_lib.Compute(make_apply(tokenizer, e.flip), tokenizer.variables, config.data.resolution,
                                 e.global_batch_size, e.num_devices, e.num_workers)
    return shards_lib.run_sharded(encoded_job(e.flip), workdir, header, source, compute, write=_write_shard,
                                  summarize=latent_stats)


def cli() -> None:
    from absl import app, flags, logging
    from ml_collections import config_flags

    from vqlc_jax import parallel

    config = config_flags.DEFINE_config_file("config", None, "Encode config file (configs/encode/*.py).",
                                             lock_config=True)
    tokenizer = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (Tokenizer.save, the trainer's export).")
    workdir = flags.DEFINE_string("workdir", None, "Directory for the encoded shards and manifest.")
    start_distributed = parallel.define_distributed_flags()
    flags.mark_flags_as_required(["config", "tokenizer", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        start_distributed()
        manifest = encode_dataset(config.value, tokenizer.value, workdir.value)
        logging.info("Finished: %s", {k: manifest[k] for k in ("total_images", "skipped", "num_shards",
                                                                 "token_shape", "latent_shape", "latent_mean",
                                                                 "latent_std")})

    app.run(main)


if __name__ == "__main__":
    cli()
