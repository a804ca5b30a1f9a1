"""Run a jitted function over every image of a dataset split once and write its per-image arrays to .npy shards.

The engine of the codebook feature extraction (`vqlc_jax.codebook.extract`) and of the generators' encode job
(`vqlc_jax.generators.encode`). Shard s holds source images [s * images_per_shard, (s + 1) * images_per_shard) in
the split's own order, minus the unreadable ones (counted, not written); each of the job's arrays goes to its own
file `NAME-SSSSS-of-NNNNN.npy`. `manifest.json` beside them holds the run's header (the keys in `ShardJob.run_keys`
must agree when a run resumes into the folder), one entry per written shard ({index, images, skipped, NAME: {file,
bytes, sha256}, ...} plus what the job adds) and, once every shard is written, `complete`, the totals and the date.

Images come from the evaluation pipeline (`make_pipeline(train=False)`: centre crops in [-1, 1]). The global batch
is split over the devices of all processes (jit with NamedShardings); each process decodes its own slice of every
batch and the outputs come back replicated, so process 0 alone decides what to do and writes (the directory must be
shared by the processes). A file is written atomically (temp file + rename) and then listed in the manifest; on
restart listed shards whose files exist with the recorded size and sha256 are skipped and every other shard is
redone. One pipeline serves each run of consecutive shards to do; the next batch is dispatched before the previous
one is fetched. Progress is logged per shard with images/s and the ETA.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from vqlc_jax import parallel
from vqlc_jax.data import make_source
from vqlc_jax.data.pipeline import make_pipeline
from vqlc_jax.data.sources import Source, Subset

LOG = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
PREPROCESSING = "PIL bicubic resize of the smaller side to data.resolution, centre crop, [-1, 1]"

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What a sharded job is called and writes. `name` ("extraction") and `shard` ("feature") appear in messages
    ("written by another extraction", "feature shard ... is missing"); `command` says how to run it; `files` are
    the arrays of every shard entry (one .npy each); `run_keys` the header keys a resumed run must agree on (the
    header must hold `images_per_shard` and `num_shards`)."""

    name: str
    shard: str
    command: str
    files: tuple[str, ...]
    run_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Compute:
    """`apply(params, images)`: [B, R, R, 3] images in [-1, 1] -> {name: per-image array [B, ...]} (pure; jitted
    here), over batches of `global_batch_size` images at `resolution` split over `num_devices` devices (0: all) and
    decoded by `num_workers` threads (0: Python's default)."""

    apply: Callable[[Any, jax.Array], dict[str, jax.Array]]
    params: Any
    resolution: int
    global_batch_size: int
    num_devices: int = 0
    num_workers: int = 0


def split_source(data: Mapping[str, Any]) -> Source:
    """The split a job's `data` config names (`name`, `split`, `options`), its first `max_images` (0: all)."""
    source = make_source(data["name"], data["split"], dict(data["options"]))
    return Subset(source, data["max_images"]) if data["max_images"] else source


def dataset_info(data: Mapping[str, Any], source: Source) -> dict[str, Any]:
    """The manifest's description of the split (`data` config and `split_source(data)`)."""
    return {"name": data["name"], "split": data["split"], "options": dict(data["options"]),
            "resolution": data["resolution"], "max_images": data["max_images"], "num_images": len(source),
            "num_classes": source.num_classes}


# ----------------------------------------------------------------------------------------------- files
def sha256(path: pathlib.Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _temporary(path: pathlib.Path) -> pathlib.Path:
    """A hidden sibling to write before renaming onto `path` (leftovers are removed by the next run)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_npy(path: pathlib.Path, array: np.ndarray) -> dict[str, Any]:
    """np.save atomically (temp file + rename); returns the file's {file, bytes, sha256}."""
    tmp = _temporary(path)
    with tmp.open("wb") as handle:
        np.save(handle, array)
    entry = {"file": path.name, "bytes": tmp.stat().st_size, "sha256": sha256(tmp)}
    os.replace(tmp, path)
    return entry


def shard_name(name: str, index: int, count: int) -> str:
    return f"{name}-{index:05d}-of-{count:05d}.npy"


def save_shard_arrays(directory: pathlib.Path, index: int, count: int, arrays: Arrays) -> dict[str, dict]:
    """Each of `arrays` saved (atomically) as shard `index` of `count`; returns {name: {file, bytes, sha256}}."""
    return {name: save_npy(directory / shard_name(name, index, count), array) for name, array in arrays.items()}


def write_json(path: pathlib.Path, value: dict) -> None:
    tmp = _temporary(path)
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def intact(directory: pathlib.Path, entry: dict, *, check_hash: bool) -> bool:
    """Whether the file of a manifest entry exists with its size (and, with `check_hash`, its sha256)."""
    path = directory / entry["file"]
    return (path.is_file() and path.stat().st_size == entry["bytes"]
            and (not check_hash or sha256(path) == entry["sha256"]))


def read_manifest(job: ShardJob, directory: str | os.PathLike) -> dict:
    """`directory/manifest.json`; FileNotFoundError naming it (and how to write it) if absent."""
    path = pathlib.Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {job.shard} manifest {path}: run the {job.name} first ({job.command})")
    return json.loads(path.read_text())


def open_complete(job: ShardJob, directory: str | os.PathLike) -> dict:
    """The manifest of a finished run in `directory`; raises naming the folder if it is unfinished, or the file if
    a shard file is missing or has another size (hashes are checked when a run resumes, not here)."""
    directory = pathlib.Path(directory)
    manifest = read_manifest(job, directory)
    shards = manifest["shards"]
    if not manifest["complete"] or len(shards) != manifest["num_shards"]:
        raise ValueError(f"the {job.name} in {directory} is unfinished ({len(shards)} of {manifest['num_shards']} "
                         f"shards); run the {job.name} again to complete it ({job.command})")
    for shard in shards:
        for name in job.files:
            if not intact(directory, shard[name], check_hash=False):
                raise ValueError(f"{job.shard} shard {directory / shard[name]['file']} is missing or was changed; "
                                 f"run the {job.name} again to redo it ({job.command})")
    return manifest


def _completed(job: ShardJob, directory: pathlib.Path, header: dict) -> dict[int, dict]:
    """The intact shards listed in an existing manifest, by index; raises if another run wrote it."""
    if not (directory / MANIFEST_NAME).is_file():
        return {}
    old = read_manifest(job, directory)
    diff = {key: (old.get(key), header[key]) for key in job.run_keys if old.get(key) != header[key]}
    if diff:
        raise ValueError(f"{directory / MANIFEST_NAME} was written by another {job.name}; (manifest, this run) "
                         f"differ in {diff}: use another workdir or delete {directory} (nothing was overwritten)")
    done = {s["index"]: s for s in old["shards"]
            if all(intact(directory, s[name], check_hash=True) for name in job.files)}
    for s in old["shards"]:
        if s["index"] not in done:
            LOG.warning("%s shard %d (%s) is missing or corrupt: redoing it", job.shard, s["index"],
                        ", ".join(s[name]["file"] for name in job.files))
    return done


# ----------------------------------------------------------------------------------------------- processes
def _agreed(todo: np.ndarray) -> np.ndarray:
    """Process 0's bool mask of shards to do, on every process (same shape everywhere)."""
    if jax.process_count() == 1:
        return todo
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(todo))


def sync(name: str) -> None:
    """Waits for every process (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------- the run
def run_sharded(job: ShardJob, directory: str | os.PathLike, header: dict, source: Source, compute: Compute, *,
                write: Callable[[pathlib.Path, int, int, Arrays], dict],
                summarize: Callable[[list[dict]], dict] = lambda shards: {}) -> dict:
    """Writes (or finishes writing) every shard of `header` into `directory` (module docstring); returns the
    manifest.

    `write(directory, index, num_shards, arrays)` writes shard `index` from `arrays` (`compute`'s outputs and
    `label`, int32, of the shard's readable images; usually via `save_shard_arrays`) and returns what its manifest
    entry holds besides index/images/skipped; `summarize(shard entries)` adds keys to the finished manifest.
    """
    directory = pathlib.Path(directory)
    header = json.loads(json.dumps(header))  # JSON types (lists, not tuples): compares equal to a manifest's
    is_main = jax.process_index() == 0
    num_shards, per_shard = header["num_shards"], header["images_per_shard"]
    done = _completed(job, directory, header) if is_main else {}
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".*.tmp"):  # a write cut short by a crash
            stale.unlink()
    todo = np.flatnonzero(_agreed(np.asarray([s not in done for s in range(num_shards)], bool)))
    manifest = {**header, "complete": False, "shards": sorted(done.values(), key=lambda s: s["index"])}
    LOG.info("%s: %d of %d shards to write (%d images, %d per shard) into %s", job.name, len(todo), num_shards,
             len(source), per_shard, directory)
    progress = _Progress(job, num_shards, sum(min(per_shard, len(source) - i * per_shard) for i in todo.tolist()))
    for index, arrays, mask in _shard_outputs(source, compute, per_shard, todo):
        if is_main:
            kept = {name: array[mask] for name, array in arrays.items()}
            entry = {"index": index, "images": len(mask), "skipped": int((~mask).sum()),
                     **write(directory, index, num_shards, kept)}
            manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda s: s["index"])
            write_json(directory / MANIFEST_NAME, manifest)
        progress.shard_done(index, len(mask))
    if is_main:
        shards = manifest["shards"]
        manifest.update(complete=True, **summarize(shards),
                        total_images=sum(s["images"] - s["skipped"] for s in shards),
                        skipped=sum(s["skipped"] for s in shards),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        write_json(directory / MANIFEST_NAME, manifest)
        if manifest["skipped"]:
            LOG.warning("%d unreadable images were left out (per-shard counts in %s)", manifest["skipped"],
                        directory / MANIFEST_NAME)
    sync(f"vqlc_jax.data.shards: {job.name} manifest written")
    return read_manifest(job, directory)


def _runs(indices: np.ndarray) -> Iterator[list[int]]:
    """Runs of consecutive integers in sorted `indices`."""
    for _, group in itertools.groupby(enumerate(indices.tolist()), key=lambda pair: pair[1] - pair[0]):
        yield [index for _, index in group]


def _shard_outputs(source: Source, compute: Compute, per_shard: int, todo: np.ndarray
                   ) -> Iterator[tuple[int, Arrays, np.ndarray]]:
    """(index, {name: [n, ...]} with `label`, mask [n]) of each shard in `todo`, host side, n = the shard's source
    images (the final batch's padding dropped); one pipeline per run of consecutive shards."""
    if per_shard % compute.global_batch_size:
        raise ValueError(f"images_per_shard={per_shard} must be a multiple of global_batch_size="
                         f"{compute.global_batch_size}")
    mesh = parallel.make_mesh(devices=jax.devices()[: compute.num_devices or None])
    parallel.check_batch_size(compute.global_batch_size, mesh)
    rows, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    step = jax.jit(lambda params, images, labels, mask: ({**compute.apply(params, images), "label": labels}, mask),
                   in_shardings=(replicated, rows, rows, rows), out_shardings=replicated)
    # From host copies: a process cannot send its local device arrays to other hosts' devices.
    params = jax.device_put(jax.tree.map(np.asarray, compute.params), replicated)
    steps_per_shard = per_shard // compute.global_batch_size
    total_steps = math.ceil(len(source) / compute.global_batch_size)
    for run in _runs(todo):
        first, stop = run[0] * steps_per_shard, min((run[-1] + 1) * steps_per_shard, total_steps)
        batches = iter(make_pipeline(
            source, resolution=compute.resolution, global_batch_size=compute.global_batch_size, seed=0, train=False,
            process_index=jax.process_index(), process_count=jax.process_count(), start_step=first,
            num_workers=compute.num_workers or None))
        try:
            outputs = _outputs(itertools.islice(batches, stop - first), step, params, rows)
            for index in run:
                parts = list(itertools.islice(outputs, min(steps_per_shard, total_steps - index * steps_per_shard)))
                images = min(per_shard, len(source) - index * per_shard)
                arrays = {name: np.concatenate([part[name] for part, _ in parts])[:images] for name in parts[0][0]}
                yield index, arrays, np.concatenate([mask for _, mask in parts])[:images]
        finally:
            batches.close()


def _outputs(batches: Iterator, step: Callable, params: Any, rows: jax.sharding.NamedSharding
             ) -> Iterator[tuple[Arrays, np.ndarray]]:
    """({name: [B, ...]}, mask [B]) of every global batch, host side; the next batch is dispatched before the
    previous one is fetched, so decoding, transfers and compute overlap."""
    pending = None
    for batch in batches:
        arrays = (batch.image, batch.label, batch.mask)
        result = step(params, *(parallel.global_batch(a, rows) for a in arrays))
        if pending is not None:
            yield _local_copy(pending)
        pending = result
    if pending is not None:
        yield _local_copy(pending)


def _local_copy(result: tuple[dict[str, jax.Array], jax.Array]) -> tuple[Arrays, np.ndarray]:
    """Host copies of replicated arrays (this process's first copy: multi-host arrays are not fully addressable)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), result)


class _Progress:
    """Logs each finished shard with the images/s of this run so far and the ETA of the remaining shards."""

    def __init__(self, job: ShardJob, num_shards: int, images_todo: int) -> None:
        self.job, self.num_shards, self.images_todo, self.images_done = job, num_shards, images_todo, 0
        self.start = time.perf_counter()

    def shard_done(self, index: int, images: int) -> None:
        self.images_done += images
        rate = self.images_done / max(time.perf_counter() - self.start, 1e-9)
        eta = datetime.timedelta(seconds=round((self.images_todo - self.images_done) / rate))
        LOG.info("%s shard %d/%d written: %.1f images/s, ETA %s", self.job.shard, index + 1, self.num_shards, rate,
                 eta)
