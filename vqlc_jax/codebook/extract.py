"""Pooled patch features of a dataset split, in fixed-size .npy shards: the first stage of the codebook job.

    python -m vqlc_jax.codebook.build --stage extract --config configs/codebook/<name>.py --workdir DIR

Writes `DIR/features/`: `features-SSSSS-of-NNNNN.npy` [rows, D] (float16 by default), `labels-...npy` [rows] int32
(the image's class, one per row) and `manifest.json`. Shard s holds the pooled vectors (row-major, P' per image)
of source images [s * images_per_shard, (s + 1) * images_per_shard) in the split's own order (sorted file names
for folders, the prepared record order for ImageNet; never a directory listing), minus the unreadable ones, which
the manifest counts. `NpyShards(manifest's feature files)` streams them to k-means (`open_features`).

Images come from the evaluation pipeline (`vqlc_jax.data.make_pipeline(train=False)`): PIL bicubic (antialiased)
resize of the smaller side to `data.resolution`, centre crop, [-1, 1]: the CLIP processor's recipe (the release
used 224 px), identical on square images. On others the pipeline keeps the scale exactly isotropic and rounds the
crop offset where the processor truncates the long side to an int and floors the offset: the crop can sit one pixel
over and the long axis is scaled up to ~0.3% differently (measured on the bundled photos: 0 grey levels on square
and 400x600 photos, 2-8 mean abs on 300x451 and 427x640 ones). The CLIP mean/std (from the checkpoint's
preprocessor_config.json, else OpenAI's) are applied in the jitted step.

Engineering (`vqlc_jax.data.shards`, shared with the generators' encode job): the global batch is split over all
devices of all processes, process 0 alone writes the shards and the manifest (the workdir must be shared by the
processes), shards are written atomically and resumed (listed shards whose files have the recorded size and sha256
are skipped, every other shard is redone), and progress is logged per shard with images/s and the ETA.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax import data as data_lib
from vqlc_jax.codebook.kmeans_data import NpyShards
from vqlc_jax.data import shards as shards_lib

LOG = logging.getLogger(__name__)
FEATURES_DIR = "features"
MANIFEST_NAME = shards_lib.MANIFEST_NAME
FORMAT = 1
EXTRACTORS = ("clip", "pixels")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FEATURE_DTYPES = ("float16", "float32")  # what np.load reads back without ml_dtypes
# The sharded job: its files per shard, and the manifest keys that must agree with the config resuming into it.
JOB = shards_lib.ShardJob(
    name="extraction", shard="feature", command="python -m vqlc_jax.codebook.build --stage extract --config ... --workdir ...",
    files=("features", "labels"),
    run_keys=("format", "extractor", "dataset", "vectors_per_image", "dim", "dtype", "images_per_shard",
              "num_shards"))


class Extractor(NamedTuple):
    """`apply(params, images)`: the pipeline's [-1, 1] NHWC images -> pooled features [B, P', D], pure (to jit);
    `info`: the manifest's description of it."""

    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    info: dict[str, Any]


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {why}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key of `data`, `extractor` or `extract` whose value cannot work."""
    d, e, x = config.data, config.extractor, config.extract
    _require(d.name in data_lib.SOURCES, "data.name", d.name, f"choices: {', '.join(data_lib.SOURCES)}")
    _require(d.resolution > 0, "data.resolution", d.resolution, "must be positive")
    _require(d.max_images >= 0, "data.max_images", d.max_images, "must be >= 0 (0: the whole split)")
    _require(e.name in EXTRACTORS, "extractor.name", e.name, f"choices: {', '.join(EXTRACTORS)}")
    _require(e.dtype in COMPUTE_DTYPES, "extractor.dtype", e.dtype, f"choices: {', '.join(COMPUTE_DTYPES)}")
    _require(e.pool > 0, "extractor.pool", e.pool, "must be positive")
    if e.name == "clip":
        _require(bool(e.checkpoint), "extractor.checkpoint", e.checkpoint,
                 "the clip extractor needs a local Hugging Face CLIP folder (config.json + model.safetensors)")
    else:
        _require(not e.checkpoint, "extractor.checkpoint", e.checkpoint, "the pixels extractor uses no weights")
        _require(e.patch_size > 0, "extractor.patch_size", e.patch_size, "must be positive")
    _require(e.name == "pixels" or e.rms_scale, "extractor.rms_scale", e.rms_scale,
             "only the pixels extractor has it (CLIP features are used as they come)")
    _require(x.global_batch_size > 0, "extract.global_batch_size", x.global_batch_size, "must be positive")
    _require(x.images_per_shard > 0 and x.images_per_shard % x.global_batch_size == 0, "extract.images_per_shard",
             x.images_per_shard, f"must be a positive multiple of extract.global_batch_size={x.global_batch_size}")
    _require(x.feature_dtype in FEATURE_DTYPES, "extract.feature_dtype", x.feature_dtype,
             f"choices: {', '.join(FEATURE_DTYPES)}")
    _require(x.num_devices >= 0, "extract.num_devices", x.num_devices, "must be >= 0 (0: all devices)")
    _require(x.num_devices == 0 or jax.process_count() == 1, "extract.num_devices", x.num_devices,
             "a multi-process run uses all devices (0)")
    _require(x.num_workers >= 0, "extract.num_workers", x.num_workers, "must be >= 0 (0: Python's default)")


# ----------------------------------------------------------------------------------------------- the extractor
def make_extractor(cfg: ml_collections.ConfigDict) -> Extractor:
    """The `pixels` or `clip` extractor of `config.extractor`. The clip one loads `cfg.checkpoint` and raises
    FileNotFoundError naming it when it is missing; it never falls back to another extractor."""
    dtype = COMPUTE_DTYPES[cfg.dtype]
    if cfg.name == "pixels":
        from vqlc_jax.codebook.pixels import PixelPatchExtractor

        pixels = PixelPatchExtractor(cfg.patch_size, cfg.pool, rms_scale=cfg.rms_scale, dtype=dtype)
        info = {"name": "pixels", "patch_size": cfg.patch_size, "rms_scale": cfg.rms_scale, "pool": cfg.pool,
                "dtype": cfg.dtype}
        return Extractor(lambda params, images: pixels.features(params, images)["pooled_features"], pixels.params,
                         info)
    if cfg.name != "clip":
        raise ValueError(f"config.extractor.name={cfg.name!r}: choices: {', '.join(EXTRACTORS)}")
    from vqlc_jax.codebook.clip import CLIPFeatureExtractor, resolve_checkpoint

    try:
        folder = resolve_checkpoint(cfg.checkpoint)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config.extractor.checkpoint: {err}") from err
    clip = CLIPFeatureExtractor.from_pretrained(folder, layer=cfg.layer, apply_post_layernorm=cfg.post_layernorm,
                                                apply_projection=cfg.projection, pool=cfg.pool, dtype=dtype)
    mean = np.asarray(clip.preprocessing["mean"], np.float32)
    std = np.asarray(clip.preprocessing["std"], np.float32)

    def apply(params: Any, images: jax.Array) -> jax.Array:
        pixel_values = ((images + 1) * 0.5 - mean) / std  # [-1, 1] -> [0, 1] -> CLIP-normalised
        return clip.features(params, pixel_values)["pooled_features"]

    info = {"name": "clip", "checkpoint": str(folder.absolute()), "layer": cfg.layer,
            "post_layernorm": cfg.post_layernorm, "projection": cfg.projection, "pool": cfg.pool,
            "dtype": cfg.dtype, "image_size": clip.config.image_size, "patch_size": clip.config.patch_size,
            "mean": mean.tolist(), "std": std.tolist()}
    return Extractor(apply, clip.params, info)


# ----------------------------------------------------------------------------------------------- files
def read_manifest(directory: str | os.PathLike) -> dict:
    """`directory/manifest.json` (the extraction's features folder); FileNotFoundError naming it if absent."""
    return shards_lib.read_manifest(JOB, directory)


def open_features(directory: str | os.PathLike) -> tuple[NpyShards, np.ndarray, dict]:
    """(features streamed from the shards, labels int32 [rows], manifest) of a complete extraction in `directory`.
    Raises naming the folder if the extraction is unfinished or a shard file is missing or has another size."""
    directory = pathlib.Path(directory)
    manifest = shards_lib.open_complete(JOB, directory)
    written = [s for s in manifest["shards"] if s["rows"]]  # shards whose images were all unreadable hold no rows
    if not written:
        raise ValueError(f"the extraction in {directory} has no feature rows (all {manifest['skipped']} images "
                         f"were unreadable)")
    features = NpyShards([directory / s["features"]["file"] for s in written])
    labels = np.concatenate([np.load(directory / s["labels"]["file"]) for s in written])
    return features, labels, manifest


# ----------------------------------------------------------------------------------------------- the job
def _run_header(config: ml_collections.ConfigDict, extractor: Extractor, source: data_lib.Source) -> dict:
    d, x = config.data, config.extract
    shape = jax.eval_shape(extractor.apply, extractor.params,
                           jax.ShapeDtypeStruct((1, d.resolution, d.resolution, 3), jnp.float32)).shape
    return {
        "format": FORMAT,
        "extractor": extractor.info,
        "dataset": shards_lib.dataset_info(d, source),
        "preprocessing": shards_lib.PREPROCESSING + (", CLIP mean/std" if extractor.info["name"] == "clip" else ""),
        "vectors_per_image": shape[1],
        "dim": shape[2],
        "dtype": x.feature_dtype,
        "images_per_shard": x.images_per_shard,
        "rows_per_shard": x.images_per_shard * shape[1],
        "num_shards": math.ceil(len(source) / x.images_per_shard),
    }


def extract_features(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Extracts (or finishes extracting) `config`'s features into `workdir/features` (module docstring); returns
    the manifest."""
    check_config(config)
    source = shards_lib.split_source(config.data)
    extractor = make_extractor(config.extractor)
    header = _run_header(config, extractor, source)
    if extractor.info["name"] == "clip" and config.data.resolution != extractor.info["image_size"]:
        LOG.warning("data.resolution=%d differs from the CLIP checkpoint's image_size=%d: position embeddings are "
                    "interpolated", config.data.resolution, extractor.info["image_size"])
    x, dtype = config.extract, jnp.dtype(config.extract.feature_dtype)
    compute = shards_lib.Compute(lambda params, images: {"features": extractor.apply(params, images).astype(dtype)},
                                 extractor.params, config.data.resolution, x.global_batch_size, x.num_devices,
                                 x.num_workers)
    return shards_lib.run_sharded(JOB, pathlib.Path(workdir) / FEATURES_DIR, header, source, compute,
                                  write=_write_shard,
                                  summarize=lambda shards: {"total_rows": sum(s["rows"] for s in shards)})


def _write_shard(directory: pathlib.Path, index: int, count: int, arrays: dict[str, np.ndarray]) -> dict:
    """Writes shard `index` of `count` from its kept images' features [n, P', D] (as [n * P', D]) and labels (each
    repeated P' times); returns its manifest entry's rows and files."""
    features = arrays["features"]
    vectors = features.shape[1]
    return {"rows": len(features) * vectors, **shards_lib.save_shard_arrays(directory, index, count, {
        "features": features.reshape(-1, features.shape[-1]),
        "labels": np.repeat(arrays["label"].astype(np.int32), vectors)})}
