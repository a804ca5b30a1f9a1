"""Mini-batch k-means for the VQGAN-LC codebook: global (one k-means into N centres) or per class (the release's).

Algorithm (scikit-learn's MiniBatchKMeans, so inertias are comparable): each step draws `batch_size` rows with
replacement, assigns them to the nearest centre (matmul search in cache-sized blocks, `kmeans_search`) and moves each
centre to the running mean of every point it was ever assigned, c <- (c n + sum of new points) / (n + new points)
(Sculley's per-centre rate 1/n). Reassignment as scikit-learn's: whenever a centre has no point yet, or every
`reassign_every` steps (default 10 k points), centres with count < reassignment_ratio x the largest count, or idle
(no point) for `dead_after` steps, are moved, lowest counts first and at most half a batch per step; their counts
restart at the smallest kept count (scikit-learn's rule). Unlike scikit-learn, which moves them to uniformly random
batch points, they go to far points: the farthest batch point of each cluster, largest first (so one new centre per
cluster per step: the plain farthest points of a batch tend to lie in one outlying cluster).

Engineering: independent problems (one, or one per class) are vmapped; the batch is split over a 1-D `data` mesh and
the per-centre sums of a global-view jit are over all devices; `steps_per_call` steps run in one `lax.scan` (batches
gathered on device for in-memory arrays, read from a `FeatureSource` per block otherwise); batches and inits come from
keys folded with (seed, problem id, step), so a run is deterministic for a seed and device count, and a run resumed
from a checkpoint (atomic .npz) gives the same centres as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vqlc_jax.codebook.kmeans_data import FeatureSource, NpyShards, as_source, is_resident
from vqlc_jax.codebook.kmeans_init import INIT_METHODS, init_centres
from vqlc_jax.codebook.kmeans_search import DEFAULT_CHUNK_SIZE, DEFAULT_ROW_CHUNK, DOT_DTYPES, nearest_centres
from vqlc_jax.parallel import DATA

Array = jax.Array
Features = np.ndarray | Array | FeatureSource
Callback = Callable[[int, dict], None]

LOG = logging.getLogger(__name__)
MODES = ("global", "per_class")
CODEBOOK_METHODS = ("random", "random_selection", "kmeans")
CHECKPOINT_NAME = "kmeans_state.npz"
# Options that change the trajectory: a checkpoint written with other values is refused.
_TRAJECTORY_FIELDS = ("batch_size", "seed", "init", "init_sample", "local_trials", "parallel_rounds", "oversampling",
                      "reassignment_ratio", "reassign_every", "dead_after")
_INT32_MAX = np.iinfo(np.int32).max

__all__ = [
    "CODEBOOK_METHODS", "MODES", "FeatureSource", "KMeansConfig", "NpyShards", "build_codebook",
    "codebook_from_features", "inertia", "minibatch_kmeans", "nearest_centres", "save_codebook",
]


@dataclasses.dataclass(frozen=True)
class KMeansConfig:
    """Options of mini-batch k-means; in per_class mode `batch_size` and `init_sample` are per class.

    init: "kmeans++", "kmeans||", "random" (k sample rows), or "array" (centres given by the caller).
    init_sample: rows drawn (with replacement, as scikit-learn) for the init; default max(3 batch_size, 3 k).
    local_trials: greedy k-means++ trials (default 2 + ln k); parallel_rounds, oversampling: k-means|| rounds and
      points per round / k.
    chunk_size, row_chunk: the search's [row_chunk, chunk_size] score blocks; dot_dtype: "float32" or "bfloat16".
    reassignment_ratio, reassign_every (steps; default ceil(10 k / batch_size)), dead_after (steps with no point;
      None: off): reassignment, see the module docstring.
    num_devices: devices of the data mesh (default all); the batch must split evenly over them.
    steps_per_call: steps per jitted `lax.scan`; checkpoint_every is rounded up to a multiple of it.
    log_every: steps per logged mean mini-batch inertia (and per callback call).
    """

    batch_size: int
    num_steps: int
    seed: int = 0
    init: str = "kmeans++"
    init_sample: int | None = None
    local_trials: int | None = None
    parallel_rounds: int = 5
    oversampling: float = 2.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    row_chunk: int = DEFAULT_ROW_CHUNK
    dot_dtype: str = "float32"
    reassignment_ratio: float = 0.01
    reassign_every: int | None = None
    dead_after: int | None = None
    num_devices: int | None = None
    steps_per_call: int = 32
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    log_every: int = 100

    def __post_init__(self) -> None:
        positive = ("batch_size", "parallel_rounds", "chunk_size", "row_chunk", "steps_per_call", "checkpoint_every",
                    "log_every")
        for name in positive + ("init_sample", "local_trials", "reassign_every", "dead_after", "num_devices"):
            value = getattr(self, name)
            if (value is not None or name in positive) and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"k-means option {name} must be a positive int, got {value!r}")
        if not isinstance(self.num_steps, (int, np.integer)) or self.num_steps < 0:
            raise ValueError(f"k-means option num_steps must be an int >= 0, got {self.num_steps!r}")
        if not isinstance(self.init, str) or self.init not in INIT_METHODS + ("array",):
            raise ValueError(f"unknown k-means init {self.init!r}; choices: {', '.join(INIT_METHODS)} or an array")
        if self.dot_dtype not in DOT_DTYPES:
            raise ValueError(f"k-means option dot_dtype must be one of {DOT_DTYPES}, got {self.dot_dtype!r}")
        if not 0.0 <= self.reassignment_ratio < 1.0:
            raise ValueError(f"k-means option reassignment_ratio must lie in [0, 1), got {self.reassignment_ratio}")
        if self.oversampling <= 0:
            raise ValueError(f"k-means option oversampling must be > 0, got {self.oversampling}")


def _make_config(**options: Any) -> KMeansConfig:
    fields = {f.name for f in dataclasses.fields(KMeansConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown k-means options {unknown}; options: {', '.join(sorted(fields))}")
    return KMeansConfig(**options)


# ----------------------------------------------------------------------------------------------- the jitted steps
class _Problems(NamedTuple):
    """Independent k-means problems over one feature matrix: problem p owns rows order[starts[p]:starts[p]+sizes[p]]
    and draws its random numbers from stream ids[p]."""

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    ids: np.ndarray


class _Search(NamedTuple):
    """Static settings of the sharded nearest-centre search."""

    mesh: jax.sharding.Mesh
    chunk_size: int
    row_chunk: int
    dot_dtype: str


class _Spec(NamedTuple):
    """Static settings of the jitted step."""

    search: _Search
    max_reassign: int


class _Rules(NamedTuple):
    """Reassignment settings (traced scalars: changing them does not recompile)."""

    ratio: Array
    every: Array
    dead_after: Array  # int32 max: off


def _constrain(x: Array, mesh: jax.sharding.Mesh, *spec: str | None) -> Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def _problem_rows(key: Array, tables: tuple[Array, ...], step: Array, num: int) -> Array:
    """[num_problems, num] rows drawn with replacement from each problem's rows, from keys (key, id, step)."""
    order, starts, sizes, ids = tables

    def draw(problem_id: Array, start: Array, size: Array) -> Array:
        problem_key = jax.random.fold_in(jax.random.fold_in(key, problem_id), step)
        return order[start + jax.random.randint(problem_key, (num,), 0, size)]

    return jax.vmap(draw)(ids, starts, sizes)


@functools.partial(jax.jit, static_argnames="num")
def _block_rows(key: Array, tables: tuple[Array, ...], steps: Array, *, num: int) -> Array:
    """`_problem_rows` of several steps -> [S, num_problems, num]."""
    return jax.vmap(_problem_rows, (None, None, 0, None))(key, tables, steps, num)


def _assign(x: Array, centres: Array, spec: _Search) -> tuple[Array, Array]:
    """Nearest centre and squared distance [Pr, B] of x [Pr, B, D] among centres [Pr, k, D]; each device searches
    its own rows (an explicit device axis, so the row blocks never cross devices)."""
    num_problems, batch, dim = x.shape
    local = _constrain(x.reshape(num_problems, spec.mesh.size, batch // spec.mesh.size, dim), spec.mesh, None, DATA)
    search = functools.partial(nearest_centres, chunk_size=spec.chunk_size, row_chunk=spec.row_chunk,
                               dot_dtype=spec.dot_dtype)
    labels, dist = jax.vmap(jax.vmap(search, (0, None)))(local, centres)
    return labels.reshape(num_problems, batch), dist.reshape(num_problems, batch)


def _reseed(centres: Array, counts: Array, idle: Array, x: Array, labels: Array, dist: Array, check: Array,
            rules: _Rules, spec: _Spec) -> tuple[Array, Array, Array, Array]:
    """One problem's reassignment: dead centres (lowest counts first) move to far batch points, at most
    spec.max_reassign of them; their counts restart at the smallest kept count.

    The far points are, per centre with points in the batch, its farthest one, taken in decreasing distance: at most
    one new centre per existing cluster per step, so several dead centres never land in the same outlying cluster."""
    num_centres, batch = counts.shape[0], dist.shape[0]
    dead = check & ((counts < rules.ratio * jnp.max(counts)) | (idle >= rules.dead_after))
    _, targets = jax.lax.top_k(-jnp.where(dead, counts, _INT32_MAX), spec.max_reassign)
    farthest = jax.ops.segment_max(dist, labels, num_centres)  # -inf for centres without points
    position = jnp.where(dist == farthest[labels], jnp.arange(batch), batch)
    candidate = jax.ops.segment_min(position, labels, num_centres)
    score, owners = jax.lax.top_k(farthest, spec.max_reassign)
    valid = (jnp.arange(spec.max_reassign) < jnp.sum(dead)) & (score > 0)
    far = jnp.minimum(candidate[owners], batch - 1)
    centres = centres.at[targets].set(jnp.where(valid[:, None], x[far], centres[targets]))
    moved = jnp.zeros(counts.shape, bool).at[targets].set(valid)
    kept_min = jnp.min(jnp.where(moved, _INT32_MAX, counts))
    counts = jnp.where(moved, jnp.where(kept_min == _INT32_MAX, 0, kept_min), counts)
    return centres, counts, jnp.where(moved, 0, idle), jnp.sum(moved)


def _step(state: dict[str, Array], x: Array, rules: _Rules, spec: _Spec
          ) -> tuple[dict[str, Array], tuple[Array, Array]]:
    """One mini-batch step of every problem on its batch x [Pr, B, D]."""
    centres, counts, idle = state["centres"], state["counts"], state["idle"]
    num_problems, k, dim = centres.shape
    labels, dist = _assign(x, centres, spec.search)
    segments = (labels + k * jnp.arange(num_problems, dtype=jnp.int32)[:, None]).reshape(-1)
    sums = jax.ops.segment_sum(x.reshape(-1, dim), segments, num_problems * k).reshape(centres.shape)
    hits = jax.ops.segment_sum(jnp.ones_like(segments), segments, num_problems * k).reshape(counts.shape)
    new_counts = counts + hits
    updated = (centres * counts[..., None] + sums) * (1.0 / jnp.maximum(new_counts, 1))[..., None]
    centres = jnp.where(hits[..., None] > 0, updated, centres)
    idle = jnp.where(hits > 0, 0, idle + 1)
    since = state["since_reassign"] + 1
    check = jnp.any(counts == 0, axis=1) | (since >= rules.every)
    centres, new_counts, idle, moved = jax.lax.cond(
        jnp.any(check),
        jax.vmap(functools.partial(_reseed, rules=rules, spec=spec)),
        lambda c, n, i, *_: (c, n, i, jnp.zeros(num_problems, jnp.int32)),
        centres, new_counts, idle, x, labels, dist, check)
    state = {"centres": centres, "counts": new_counts, "idle": idle, "since_reassign": jnp.where(check, 0, since),
             "step": state["step"] + 1}
    return state, (jnp.mean(dist), jnp.sum(moved))


@functools.partial(jax.jit, static_argnames=("spec", "batch_size"), donate_argnames="state")
def _run_block(state: dict[str, Array], steps: Array, active: Array, batches: Array | None, data: Array | None,
               tables: tuple[Array, ...], key: Array, rules: _Rules, *, spec: _Spec, batch_size: int
               ) -> tuple[dict[str, Array], tuple[Array, Array]]:
    """The active steps of one block; batches [S, Pr, B, D] are given, or gathered on device from `data`.
    Returns the state and per-step (mean squared distance of the batch, centres reassigned), zeros when inactive."""

    def body(state: dict[str, Array], inputs: tuple[Array, Array, Array | None]):
        step, is_active, batch = inputs
        mesh = spec.search.mesh
        if data is not None:
            batch = data[_constrain(_problem_rows(key, tables, step, batch_size), mesh, None, DATA)]
        batch = _constrain(batch, mesh, None, DATA, None)
        return jax.lax.cond(is_active, lambda s: _step(s, batch, rules, spec),
                            lambda s: (s, (jnp.float32(0), jnp.int32(0))), state)

    return jax.lax.scan(body, state, (steps, active, batches))


@functools.partial(jax.jit, static_argnames=("k", "method", "local_trials", "rounds", "oversampling", "chunk_size",
                                             "row_chunk"))
def _init_problems(keys: Array, samples: Array, *, k: int, method: str, local_trials: int | None, rounds: int,
                   oversampling: float, chunk_size: int, row_chunk: int) -> Array:
    init = functools.partial(init_centres, k=k, method=method, local_trials=local_trials, rounds=rounds,
                             oversampling=oversampling, chunk_size=chunk_size, row_chunk=row_chunk)
    return jax.vmap(init)(keys, samples)


# ---------------------------------------------------------------------------------------------- the host loop
def _data_mesh(num_devices: int | None) -> jax.sharding.Mesh:
    """A 1-D `data` mesh (Auto axes: a global-view jit, XLA inserts the cross-device sums) over the first devices."""
    devices = jax.devices()
    num = len(devices) if num_devices is None else num_devices
    if num > len(devices):
        raise ValueError(f"num_devices={num} but only {len(devices)} devices are visible")
    return jax.make_mesh((num,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:num])


class _MetricLog:
    """Mean mini-batch inertia and reassignments per `log_every` steps, to logging, a callback and a history."""

    def __init__(self, num_steps: int, log_every: int, callback: Callback | None) -> None:
        self.num_steps, self.log_every, self.callback = num_steps, log_every, callback
        self.inertia: list[float] = []
        self.reassigned = 0
        self.history: list[dict] = []

    def add(self, steps: np.ndarray, active: np.ndarray, metrics: tuple[Array, Array]) -> None:
        inertia, reassigned = (np.asarray(m)[active] for m in metrics)
        for step, value, moved in zip(steps[active], inertia, reassigned):
            self.inertia.append(float(value))
            self.reassigned += int(moved)
            done = int(step) + 1
            if done % self.log_every == 0 or done == self.num_steps:
                entry = {"step": done, "batch_inertia": float(np.mean(self.inertia)), "reassigned": self.reassigned}
                LOG.info("k-means step %d/%d: mean batch inertia %.6g, %d centres reassigned", done, self.num_steps,
                         entry["batch_inertia"], entry["reassigned"])
                self.history.append(entry)
                if self.callback is not None:
                    self.callback(done, entry)
                self.inertia, self.reassigned = [], 0


def _fingerprint(config: KMeansConfig, k: int, dim: int, problems: _Problems, initial: np.ndarray | None) -> dict:
    digest = hashlib.sha1()
    for array in (*problems, initial):
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    fingerprint = {**{name: getattr(config, name) for name in _TRAJECTORY_FIELDS}, "k": k, "dim": dim,
                   "problems": digest.hexdigest()}
    return json.loads(json.dumps(fingerprint, default=_json_default))  # as a checkpoint reads it back


def _save_checkpoint(directory: pathlib.Path, state: dict[str, Array], fingerprint: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(value) for name, value in state.items()}
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        np.savez(handle, fingerprint=np.array(json.dumps(fingerprint)), **arrays)
    os.replace(handle.name, directory / CHECKPOINT_NAME)


def _load_checkpoint(directory: pathlib.Path, fingerprint: dict) -> dict[str, np.ndarray] | None:
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    with np.load(path) as saved:
        written = json.loads(str(saved["fingerprint"]))
        state = {name: saved[name] for name in saved.files if name != "fingerprint"}
    diff = {key: (written.get(key), fingerprint[key]) for key in fingerprint if written.get(key) != fingerprint[key]}
    if diff:
        raise ValueError(f"k-means checkpoint {path} belongs to another run; (checkpoint, this run) differ in {diff}")
    LOG.info("k-means: resuming from %s at step %d", path, int(state["step"]))
    return state


def _fit(data: Features, problems: _Problems, k: int, config: KMeansConfig, *, initial: np.ndarray | None = None,
         callback: Callback | None = None) -> tuple[np.ndarray, list[dict]]:
    """Runs every problem; returns centres [Pr, k, D] float32 and the logged history."""
    resident = is_resident(data)
    source = None if resident else as_source(data)
    if resident and np.ndim(data) != 2:
        raise ValueError(f"features must be 2-D [n, D], got shape {np.shape(data)}")
    num_rows, dim = data.shape if resident else (source.num_rows, source.dim)
    if num_rows >= _INT32_MAX:
        raise ValueError(f"k-means: {num_rows} rows exceed the int32 row index")
    if initial is not None and initial.shape != (len(problems.ids), k, dim):
        raise ValueError(f"k-means: initial centres have shape {initial.shape[1:]}, expected ({k}, {dim}) "
                         f"(k, feature dim)")
    mesh = _data_mesh(config.num_devices)
    if config.batch_size % mesh.size:
        raise ValueError(f"k-means: batch_size={config.batch_size} does not split over {mesh.size} devices")
    replicated = NamedSharding(mesh, P())
    tables = tuple(jax.device_put(np.asarray(t, np.int32), replicated) for t in problems)
    base_key = jax.random.key(config.seed)
    batch_key, init_key = jax.random.fold_in(base_key, 0), jax.random.fold_in(base_key, 1)
    device_data = jax.device_put(jnp.asarray(data, jnp.float32), replicated) if resident else None

    def read(rows: Array) -> np.ndarray:
        """Features of rows [..., m] -> [..., m, D] float32 on the host."""
        rows = np.asarray(rows)
        if resident:
            return np.asarray(device_data[rows])
        return np.asarray(source.read(rows.reshape(-1)), np.float32).reshape(*rows.shape, dim)

    spec = _Spec(_Search(mesh, config.chunk_size, config.row_chunk, config.dot_dtype),
                 min(config.batch_size // 2, k) or 1)
    rules = _Rules(np.float32(config.reassignment_ratio),
                   np.int32(config.reassign_every or math.ceil(10 * k / config.batch_size)),
                   np.int32(_INT32_MAX if config.dead_after is None else config.dead_after))
    fingerprint = _fingerprint(config, k, dim, problems, initial)
    checkpoint_dir = None if config.checkpoint_dir is None else pathlib.Path(config.checkpoint_dir)
    state = None if checkpoint_dir is None else _load_checkpoint(checkpoint_dir, fingerprint)
    if state is None:
        if initial is None:
            if config.init == "array":
                raise ValueError("k-means: init='array' needs the centres; pass init=<array [k, D]>")
            sample_size = config.init_sample or 3 * max(config.batch_size, k)
            if sample_size < k:
                raise ValueError(f"k-means: init_sample={sample_size} < k={k}")
            samples = read(_block_rows(init_key, tables, np.zeros(1, np.int32), num=sample_size)[0])
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(init_key, i), 1))(tables[3])
            initial = _init_problems(keys, samples, k=k, method=config.init, local_trials=config.local_trials,
                                     rounds=config.parallel_rounds, oversampling=config.oversampling,
                                     chunk_size=config.chunk_size, row_chunk=config.row_chunk)
        num_problems = len(problems.ids)
        state = {"centres": np.asarray(initial, np.float32), "counts": np.zeros((num_problems, k), np.int32),
                 "idle": np.zeros((num_problems, k), np.int32), "since_reassign": np.zeros(num_problems, np.int32),
                 "step": np.int32(0)}
    state = jax.device_put(state, replicated)

    start, block = int(state["step"]), config.steps_per_call
    checkpoint_every = -(-config.checkpoint_every // block) * block
    log = _MetricLog(config.num_steps, config.log_every, callback)
    batch_sharding = NamedSharding(mesh, P(None, None, DATA, None))
    pending = None
    for block_start in range(start // block * block, config.num_steps, block):
        steps = np.arange(block_start, block_start + block, dtype=np.int32)
        active = (steps >= start) & (steps < config.num_steps)
        batches = None
        if not resident:  # read this block's rows while the previous block runs
            rows = np.asarray(_block_rows(batch_key, tables, steps, num=config.batch_size))
            batches = np.zeros((*rows.shape, dim), np.float32)
            batches[active] = read(rows[active])
            batches = jax.device_put(batches, batch_sharding)
        state, metrics = _run_block(state, steps, active, batches, device_data, tables, batch_key, rules,
                                    spec=spec, batch_size=config.batch_size)
        if pending is not None:
            log.add(*pending)
        pending = (steps, active, metrics)
        block_end = min(block_start + block, config.num_steps)
        if checkpoint_dir is not None and (block_end % checkpoint_every == 0 or block_end == config.num_steps):
            _save_checkpoint(checkpoint_dir, state, fingerprint)
    if pending is not None:
        log.add(*pending)
    return np.asarray(state["centres"]), log.history


def _problems_of(labels: np.ndarray | None, num_rows: int) -> tuple[_Problems, np.ndarray]:
    """One problem over all rows (labels None), or one per class in sorted class order; and the classes."""
    if labels is None:
        zero = np.zeros(1, np.int64)
        return _Problems(np.arange(num_rows), zero, np.full(1, num_rows), zero), np.zeros(0)
    labels = np.asarray(labels)
    if labels.shape != (num_rows,):
        raise ValueError(f"labels must have shape ({num_rows},) (one per feature row), got {labels.shape}")
    classes, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(classes))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return _Problems(np.argsort(inverse, kind="stable"), starts, sizes, np.arange(len(classes))), classes


def _check_k(k: int, problems: _Problems, classes: np.ndarray, name: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    too_small = np.flatnonzero(problems.sizes < k)
    if too_small.size:
        where = f"class {classes[too_small[0]].item()!r}" if classes.size else "the data"
        raise ValueError(f"{name}={k} > {problems.sizes[too_small[0]]} rows of {where} (k cannot exceed the rows)")


# ------------------------------------------------------------------------------------------------- public API
def minibatch_kmeans(data: Features, k: int, *, batch_size: int, num_steps: int, seed: int = 0,
                     init: str | np.ndarray = "kmeans++", callback: Callback | None = None,
                     **options: Any) -> np.ndarray:
    """Mini-batch k-means of the rows of `data` into k centres -> [k, D] float32.

    Args:
      data: features [n, D]: an in-memory array (copied to every device), a memory-mapped .npy or any
        `FeatureSource` (rows read per block of steps).
      init: "kmeans++", "kmeans||", "random", or initial centres [k, D].
      callback: called as callback(step, {"step", "batch_inertia", "reassigned"}) every `log_every` steps.
      options: the other fields of `KMeansConfig` (chunking, bf16 search, reassignment, devices, checkpointing).
    """
    initial = None if isinstance(init, str) else np.asarray(init, np.float32)[None]
    config = _make_config(batch_size=batch_size, num_steps=num_steps, seed=seed,
                          init=init if initial is None else "array", **options)
    num_rows = data.shape[0] if is_resident(data) else as_source(data).num_rows
    problems, classes = _problems_of(None, num_rows)
    _check_k(k, problems, classes, "k")
    return _fit(data, problems, k, config, initial=initial, callback=callback)[0][0]


def build_codebook(features: Features, labels: np.ndarray | None = None, *, mode: str = "global",
                   k_total: int | None = None, k_per_class: int | None = None, classes_per_run: int | None = None,
                   callback: Callback | None = None, **options: Any) -> tuple[np.ndarray, dict]:
    """A k-means codebook -> (centres [N, D] float32, metadata for `save_codebook`).

    mode "global": one k-means of all rows into k_total centres (labels unused). mode "per_class": k_per_class
    centres per class of `labels` [n], classes in sorted order (the release's recipe with a reproducible row order),
    N = classes x k_per_class; `batch_size` is per class, the classes run vmapped, `classes_per_run` at a time
    (default all; each run checkpoints under checkpoint_dir/classes_<first>). Class c's batches and init depend on
    (seed, c) only. options: `minibatch_kmeans`'s (batch_size, num_steps, seed, init, ...).
    """
    if mode not in MODES:
        raise ValueError(f"unknown codebook mode {mode!r}; choices: {', '.join(MODES)}")
    config = _make_config(**options)
    num_rows = features.shape[0] if is_resident(features) else as_source(features).num_rows
    metadata: dict[str, Any] = {"mode": mode}
    if mode == "global":
        if k_total is None or k_per_class is not None:
            raise ValueError("mode 'global' takes k_total (and no k_per_class)")
        problems, classes = _problems_of(None, num_rows)
        _check_k(k_total, problems, classes, "k_total")
        centres, history = _fit(features, problems, k_total, config, callback=callback)
        final = history[-1]["batch_inertia"] if history else None
        metadata["k"] = k_total
    else:
        if labels is None or k_per_class is None or k_total is not None:
            raise ValueError("mode 'per_class' takes labels and k_per_class (and no k_total)")
        problems, classes = _problems_of(labels, num_rows)
        _check_k(k_per_class, problems, classes, "k_per_class")
        group = classes_per_run or len(classes)
        parts, finals = [], []
        for first in range(0, len(classes), group):
            run = _Problems(problems.order, *(t[first:first + group] for t in problems[1:]))
            run_config = config if config.checkpoint_dir is None else dataclasses.replace(
                config, checkpoint_dir=str(pathlib.Path(config.checkpoint_dir) / f"classes_{first:06d}"))
            centres, history = _fit(features, run, k_per_class, run_config, callback=callback)
            parts.append(centres)
            finals.append(history[-1]["batch_inertia"] * len(run.ids) if history else None)
        centres = np.concatenate(parts)
        final = None if None in finals else sum(finals) / len(classes)
        metadata.update(k_per_class=k_per_class, num_classes=len(classes), classes=classes.tolist())
    centres = centres.reshape(-1, centres.shape[-1])
    kmeans = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("checkpoint_dir", "checkpoint_every")}
    metadata.update(num_codes=centres.shape[0], steps=config.num_steps, kmeans=kmeans,
                    final_batch_inertia=final)
    return centres, metadata


def _distinct_rows(source: FeatureSource, n: int, rng: np.random.Generator,
                   block: int = 65536) -> np.ndarray:
    """n rows of `source` with pairwise distinct values (as float32), drawn in a random order, read in blocks."""
    order = rng.permutation(source.num_rows)
    chosen: list[np.ndarray] = []
    seen: set[bytes] = set()
    for first in range(0, source.num_rows, block):
        for row in np.asarray(source.read(order[first:first + block]), np.float32):
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                chosen.append(row)
                if len(chosen) == n:
                    return np.stack(chosen)
    raise ValueError(f"random_selection: n={n} codes asked for, but the {source.num_rows} feature rows hold only "
                     f"{len(chosen)} distinct vectors")


def codebook_from_features(features: Features, n: int, method: str, seed: int = 0,
                           **kmeans_options: Any) -> np.ndarray:
    """A codebook [n, D] float32 for the paper's initialisation ablation.

    method "random": Gaussian with the features' per-dim mean and std; "random_selection": n feature rows with
    distinct values (a repeated vector would be a code no search can pick: ties go to the lowest index);
    "kmeans": `minibatch_kmeans(features, n, seed=seed, **kmeans_options)` (batch_size and num_steps required).
    """
    if method not in CODEBOOK_METHODS:
        raise ValueError(f"unknown codebook method {method!r}; choices: {', '.join(CODEBOOK_METHODS)}")
    if method == "kmeans":
        return minibatch_kmeans(features, n, seed=seed, **kmeans_options)
    if kmeans_options:
        raise ValueError(f"codebook method {method!r} takes no k-means options, got {sorted(kmeans_options)}")
    source = as_source(features)
    rng = np.random.default_rng(seed)
    if method == "random_selection":
        return _distinct_rows(source, n, rng)
    total, total_sq = np.zeros(source.dim), np.zeros(source.dim)
    for first in range(0, source.num_rows, 65536):
        block = np.asarray(source.read(np.arange(first, min(first + 65536, source.num_rows))), np.float64)
        total += block.sum(0)
        total_sq += (block * block).sum(0)
    mean = total / source.num_rows
    std = np.sqrt(np.maximum(total_sq / source.num_rows - mean * mean, 0.0))
    return (mean + std * rng.standard_normal((n, source.dim))).astype(np.float32)


@functools.partial(jax.jit, static_argnames="spec")
def _masked_inertia(x: Array, valid: Array, centres: Array, *, spec: _Search) -> Array:
    _, dist = _assign(x[None], centres[None], spec)
    return jnp.sum(jnp.where(valid, dist[0], 0.0))


def inertia(data: Features, centres: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
            batch_size: int = 65536, row_chunk: int = DEFAULT_ROW_CHUNK, dot_dtype: str = "float32",
            num_devices: int | None = None) -> float:
    """Sum over all rows of `data` of the squared distance to the nearest centre (scikit-learn's `inertia_`),
    streamed in blocks of `batch_size` rows split over the devices."""
    source = as_source(data)
    centres = np.asarray(centres, np.float32)
    if centres.ndim != 2 or centres.shape[1] != source.dim:
        raise ValueError(f"inertia: centres of shape {centres.shape} do not match feature dim {source.dim}")
    mesh = _data_mesh(num_devices)
    spec = _Search(mesh, chunk_size, row_chunk, dot_dtype)
    batch = -(-min(batch_size, source.num_rows) // mesh.size) * mesh.size
    centres = jax.device_put(centres, NamedSharding(mesh, P()))
    sums = []
    for first in range(0, source.num_rows, batch):
        rows = np.arange(first, min(first + batch, source.num_rows))
        x = np.zeros((batch, source.dim), np.float32)
        x[: rows.size] = source.read(rows)
        x = jax.device_put(x, NamedSharding(mesh, P(DATA)))
        sums.append(_masked_inertia(x, np.arange(batch) < rows.size, centres, spec=spec))
    return float(np.sum(np.asarray(sums, np.float64)))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"codebook metadata: {type(value).__name__} value {value!r} is not JSON-serialisable")


def _atomic_write(path: pathlib.Path, write: Callable[[Any], None]) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        write(handle)
    os.replace(handle.name, path)


def save_codebook(directory: str | pathlib.Path, centres: np.ndarray, metadata: Mapping[str, Any] | None = None
                  ) -> pathlib.Path:
    """Writes `codebook.npy` [N, D] float32 and `codebook.json` (the caller's metadata, e.g. extractor, checkpoint,
    dataset, pooling and `build_codebook`'s, plus shape, sha256 and date), each atomically (temp file + rename).
    Returns the .npy path, readable by `vqlc_jax.quantizers.load_codebook`."""
    centres = np.ascontiguousarray(centres, np.float32)
    if centres.ndim != 2 or not np.isfinite(centres).all():
        raise ValueError(f"save_codebook: centres must be a finite 2-D array [N, D], got shape {centres.shape}")
    info = {**(metadata or {}), "num_codes": centres.shape[0], "dim": centres.shape[1], "dtype": "float32",
            "sha256": hashlib.sha256(centres.tobytes()).hexdigest(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(info, indent=2, default=_json_default)  # before any write: fails on bad metadata
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    npy = directory / "codebook.npy"
    _atomic_write(npy, lambda handle: np.save(handle, centres))
    _atomic_write(directory / "codebook.json", lambda handle: handle.write(text.encode()))
    return npy
