"""Pooled patch features of a dataset split, in fixed-size .npy shards: the first stage of the codebook job.

    python -m vqlc_jax.codebook.extract --config configs/codebook/<name>.py --workdir DIR

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

Engineering: the global batch is split over all devices of all processes (jit with NamedShardings); each process
decodes its own slice of every batch (make_pipeline's process_index/count) and the features come back replicated,
so process 0 alone writes the shards and the manifest (the workdir must be shared by the processes). A shard is
written atomically (temp file + rename) and then listed in the manifest; on restart listed shards whose files
exist with the recorded size and sha256 are skipped and every other shard is redone. Progress is logged per shard
with images/s and the ETA.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from vqlc_jax import data as data_lib
from vqlc_jax import parallel
from vqlc_jax.codebook.kmeans_data import NpyShards

LOG = logging.getLogger(__name__)
FEATURES_DIR = "features"
MANIFEST_NAME = "manifest.json"
FORMAT = 1
EXTRACTORS = ("clip", "pixels")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FEATURE_DTYPES = ("float16", "float32")  # what np.load reads back without ml_dtypes
# Manifest keys that must agree between a workdir's shards and the config resuming into it.
_RUN_KEYS = ("format", "extractor", "dataset", "vectors_per_image", "dim", "dtype", "images_per_shard", "num_shards")


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
def _sha256(path: pathlib.Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _temporary(path: pathlib.Path) -> pathlib.Path:
    """A hidden sibling to write before renaming onto `path` (leftovers are removed by the next run)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _save_npy(path: pathlib.Path, array: np.ndarray) -> dict[str, Any]:
    """np.save atomically (temp file + rename); returns the file's {file, bytes, sha256}."""
    tmp = _temporary(path)
    with tmp.open("wb") as handle:
        np.save(handle, array)
    entry = {"file": path.name, "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
    os.replace(tmp, path)
    return entry


def _write_json(path: pathlib.Path, value: dict) -> None:
    tmp = _temporary(path)
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _intact(directory: pathlib.Path, entry: dict, *, check_hash: bool) -> bool:
    path = directory / entry["file"]
    return (path.is_file() and path.stat().st_size == entry["bytes"]
            and (not check_hash or _sha256(path) == entry["sha256"]))


def read_manifest(directory: str | os.PathLike) -> dict:
    """`directory/manifest.json` (the extraction's features folder); FileNotFoundError naming it if absent."""
    path = pathlib.Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no feature manifest {path}: run the extraction first "
                                f"(python -m vqlc_jax.codebook.extract --config ... --workdir ...)")
    return json.loads(path.read_text())


def open_features(directory: str | os.PathLike) -> tuple[NpyShards, np.ndarray, dict]:
    """(features streamed from the shards, labels int32 [rows], manifest) of a complete extraction in `directory`.
    Raises naming the folder if the extraction is unfinished or a shard file is missing or has another size."""
    directory = pathlib.Path(directory)
    manifest = read_manifest(directory)
    shards = manifest["shards"]
    if not manifest["complete"] or len(shards) != manifest["num_shards"]:
        raise ValueError(f"the extraction in {directory} is unfinished ({len(shards)} of {manifest['num_shards']} "
                         f"shards); run the extract stage again to complete it")
    for shard in shards:
        for entry in (shard["features"], shard["labels"]):
            if not _intact(directory, entry, check_hash=False):
                raise ValueError(f"feature shard {directory / entry['file']} is missing or was changed; run the "
                                 f"extract stage again to redo it")
    written = [s for s in shards if s["rows"]]  # shards whose images were all unreadable hold no rows
    if not written:
        raise ValueError(f"the extraction in {directory} has no feature rows (all {manifest['skipped']} images "
                         f"were unreadable)")
    features = NpyShards([directory / s["features"]["file"] for s in written])
    labels = np.concatenate([np.load(directory / s["labels"]["file"]) for s in written])
    return features, labels, manifest


# ----------------------------------------------------------------------------------------------- the job
def _source(d: ml_collections.ConfigDict) -> data_lib.Source:
    source = data_lib.make_source(d.name, d.split, dict(d.options))
    return data_lib.Subset(source, d.max_images) if d.max_images else source


def _run_header(config: ml_collections.ConfigDict, extractor: Extractor, source: data_lib.Source) -> dict:
    d, x = config.data, config.extract
    shape = jax.eval_shape(extractor.apply, extractor.params,
                           jax.ShapeDtypeStruct((1, d.resolution, d.resolution, 3), jnp.float32)).shape
    return {
        "format": FORMAT,
        "extractor": extractor.info,
        "dataset": {"name": d.name, "split": d.split, "options": dict(d.options), "resolution": d.resolution,
                    "max_images": d.max_images, "num_images": len(source), "num_classes": source.num_classes},
        "preprocessing": "PIL bicubic resize of the smaller side to data.resolution, centre crop, [-1, 1]"
                         + (", CLIP mean/std" if extractor.info["name"] == "clip" else ""),
        "vectors_per_image": shape[1],
        "dim": shape[2],
        "dtype": x.feature_dtype,
        "images_per_shard": x.images_per_shard,
        "rows_per_shard": x.images_per_shard * shape[1],
        "num_shards": math.ceil(len(source) / x.images_per_shard),
    }


def _completed(directory: pathlib.Path, header: dict) -> dict[int, dict]:
    """The intact shards listed in an existing manifest, by index; raises if it was written by another run."""
    if not (directory / MANIFEST_NAME).is_file():
        return {}
    old = read_manifest(directory)
    diff = {key: (old.get(key), header[key]) for key in _RUN_KEYS if old.get(key) != header[key]}
    if diff:
        raise ValueError(f"{directory / MANIFEST_NAME} was written by another extraction; (manifest, this config) "
                         f"differ in {diff}: use another workdir or delete {directory}")
    intact = {s["index"]: s for s in old["shards"]
              if all(_intact(directory, s[kind], check_hash=True) for kind in ("features", "labels"))}
    for s in old["shards"]:
        if s["index"] not in intact:
            LOG.warning("feature shard %s is missing or corrupt: redoing it", s["features"]["file"])
    return intact


def _agreed(todo: np.ndarray) -> np.ndarray:
    """Process 0's list of shards to do, on every process."""
    if jax.process_count() == 1:
        return todo
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(todo))


def _sync(name: str) -> None:
    """Waits for every process (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _runs(indices: np.ndarray) -> Iterator[list[int]]:
    """Runs of consecutive integers in sorted `indices`."""
    for _, group in itertools.groupby(enumerate(indices.tolist()), key=lambda pair: pair[1] - pair[0]):
        yield [index for _, index in group]


def _shard_name(kind: str, index: int, count: int) -> str:
    return f"{kind}-{index:05d}-of-{count:05d}.npy"


def extract_features(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Extracts (or finishes extracting) `config`'s features into `workdir/features` (module docstring); returns
    the manifest."""
    check_config(config)
    directory = pathlib.Path(workdir) / FEATURES_DIR
    is_main = jax.process_index() == 0
    source = _source(config.data)
    extractor = make_extractor(config.extractor)
    header = _run_header(config, extractor, source)
    if extractor.info["name"] == "clip" and config.data.resolution != extractor.info["image_size"]:
        LOG.warning("data.resolution=%d differs from the CLIP checkpoint's image_size=%d: position embeddings are "
                    "interpolated", config.data.resolution, extractor.info["image_size"])
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".*.tmp"):  # a write cut short by a crash
            stale.unlink()
    done = _completed(directory, header) if is_main else {}
    num_shards, per_shard = header["num_shards"], config.extract.images_per_shard
    todo = _agreed(np.asarray([s for s in range(num_shards) if s not in done], np.int32))
    manifest = {**header, "complete": False, "shards": sorted(done.values(), key=lambda s: s["index"])}
    LOG.info("extracting %d of %d shards (%d images, %d per shard) into %s", len(todo), num_shards, len(source),
             per_shard, directory)
    progress = _Progress(num_shards, sum(min(per_shard, len(source) - i * per_shard) for i in todo.tolist()))
    for index, features, labels, mask in _shard_outputs(config, source, extractor, todo):
        if is_main:
            entry = _write_shard(directory, index, num_shards, features[mask], labels[mask], len(mask))
            manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda s: s["index"])
            _write_json(directory / MANIFEST_NAME, manifest)
        progress.shard_done(index, len(mask))
    if is_main:
        shards = manifest["shards"]
        manifest.update(complete=True, total_rows=sum(s["rows"] for s in shards),
                        total_images=sum(s["images"] - s["skipped"] for s in shards),
                        skipped=sum(s["skipped"] for s in shards),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        _write_json(directory / MANIFEST_NAME, manifest)
        if manifest["skipped"]:
            LOG.warning("%d unreadable images were left out (per-shard counts in %s)", manifest["skipped"],
                        directory / MANIFEST_NAME)
    _sync("vqlc_jax.codebook.extract: manifest written")
    return read_manifest(directory)


def _shard_outputs(config: ml_collections.ConfigDict, source: data_lib.Source, extractor: Extractor,
                   todo: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(index, features [n, P', D], labels [n], mask [n]) of each shard in `todo`, host side, n = the shard's
    source images (the final batch's padding dropped); one pipeline per run of consecutive shards."""
    x = config.extract
    mesh = parallel.make_mesh(devices=jax.devices()[: x.num_devices or None])
    parallel.check_batch_size(x.global_batch_size, mesh)
    rows, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    dtype = jnp.dtype(x.feature_dtype)
    step = jax.jit(lambda params, images, labels, mask: (extractor.apply(params, images).astype(dtype), labels, mask),
                   in_shardings=(replicated, rows, rows, rows), out_shardings=replicated)
    params = jax.device_put(extractor.params, replicated)
    steps_per_shard = x.images_per_shard // x.global_batch_size
    total_steps = math.ceil(len(source) / x.global_batch_size)
    for run in _runs(todo):
        first, stop = run[0] * steps_per_shard, min((run[-1] + 1) * steps_per_shard, total_steps)
        batches = iter(data_lib.make_pipeline(
            source, resolution=config.data.resolution, global_batch_size=x.global_batch_size, seed=0, train=False,
            process_index=jax.process_index(), process_count=jax.process_count(), start_step=first,
            num_workers=x.num_workers or None))
        try:
            outputs = _outputs(itertools.islice(batches, stop - first), step, params, rows)
            for index in run:
                parts = itertools.islice(outputs, min(steps_per_shard, total_steps - index * steps_per_shard))
                features, labels, mask = (np.concatenate(arrays) for arrays in zip(*parts))
                images = min(x.images_per_shard, len(source) - index * x.images_per_shard)
                yield index, features[:images], labels[:images], mask[:images]
        finally:
            batches.close()


def _outputs(batches: Iterator[data_lib.Batch], step: Callable, params: Any, rows: NamedSharding
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(features [B, P', D], labels [B], mask [B]) of every global batch, host side; the next batch is dispatched
    before the previous one is fetched, so decoding, transfers and compute overlap."""
    pending = None
    for batch in batches:
        arrays = (batch.image, batch.label, batch.mask)
        result = step(params, *(parallel.global_batch(a, rows) for a in arrays))
        if pending is not None:
            yield _local_copy(pending)
        pending = result
    if pending is not None:
        yield _local_copy(pending)


def _local_copy(arrays: tuple[jax.Array, ...]) -> tuple[np.ndarray, ...]:
    """Host copies of replicated arrays (this process's first copy: multi-host arrays are not fully addressable)."""
    return tuple(np.asarray(a.addressable_data(0)) for a in arrays)


def _write_shard(directory: pathlib.Path, index: int, count: int, features: np.ndarray, labels: np.ndarray,
                 images: int) -> dict:
    """Writes shard `index` (features [kept, P', D] -> [kept * P', D], each image's label repeated P' times) of
    its `images` source images; returns its manifest entry."""
    vectors = features.shape[1]
    return {
        "index": index,
        "images": images,
        "skipped": images - len(features),
        "rows": len(features) * vectors,
        "features": _save_npy(directory / _shard_name("features", index, count),
                              features.reshape(-1, features.shape[-1])),
        "labels": _save_npy(directory / _shard_name("labels", index, count),
                            np.repeat(labels.astype(np.int32), vectors)),
    }


class _Progress:
    """Logs each finished shard with the images/s of this run so far and the ETA of the remaining shards."""

    def __init__(self, num_shards: int, images_todo: int) -> None:
        self.num_shards, self.images_todo, self.images_done = num_shards, images_todo, 0
        self.start = time.perf_counter()

    def shard_done(self, index: int, images: int) -> None:
        self.images_done += images
        rate = self.images_done / max(time.perf_counter() - self.start, 1e-9)
        eta = datetime.timedelta(seconds=round((self.images_todo - self.images_done) / rate))
        LOG.info("feature shard %d/%d written: %.1f images/s, ETA %s", index + 1, self.num_shards, rate, eta)


if __name__ == "__main__":
    from vqlc_jax.codebook.build import cli

    cli(stage="extract")
