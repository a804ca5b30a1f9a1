"""Devices, meshes and shardings: one code path for 1 CPU, 8 fake CPU devices, a GPU node or a TPU pod.

The mesh has a `data` axis (the batch is split over it) and a `model` axis (size 1 unless asked for; large frozen
codebooks can be split over it by rows). Arrays are global (`jax.Array`), so reductions over the batch inside a
jitted step (losses, BatchNorm statistics, code counts, EMA statistics) are over all devices and hosts.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts `jax.distributed` when the run spans several processes.

    Explicit flags win; otherwise TPU pods and SLURM jobs are detected by JAX itself; a single process does nothing.
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def define_distributed_flags():
    """Defines the manual multi-process flags of a command line; returns `start()`, which calls
    `initialize_distributed` with their values (after absl has parsed them)."""
    from absl import flags

    coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (manual multi-process).")
    num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes (manual multi-process).")
    process_id = flags.DEFINE_integer("process_id", None, "This process's index (manual multi-process).")
    return lambda: initialize_distributed(coordinator.value, num_processes.value, process_id.value)


def make_mesh(model_axis: int = 1, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, model) mesh over all devices; `model_axis` must divide the device count."""
    devices = list(devices or jax.devices())
    if model_axis < 1 or len(devices) % model_axis:
        raise ValueError(f"mesh.model_axis={model_axis} must be a positive divisor of the {len(devices)} devices")
    # Auto axes: the compiler propagates shardings from the inputs (GSPMD), so model code needs no annotations.
    return jax.make_mesh((len(devices) // model_axis, model_axis), (DATA, MODEL), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def tree_shardings(mesh: jax.sharding.Mesh, tree: Any, rules: Sequence[tuple[str, P]] = ()) -> Any:
    """A sharding per leaf: the first rule whose regex matches the leaf's '/'-joined path, else replicated.

    A rule only applies where the mesh axis it names divides the dimension (so it is safe on any device count)."""

    def choose(path, leaf) -> NamedSharding:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        for pattern, spec in rules:
            if re.fullmatch(pattern, name) and _divides(mesh, spec, np.shape(leaf)):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(choose, tree)


def _divides(mesh: jax.sharding.Mesh, spec: P, shape: tuple[int, ...]) -> bool:
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
            return False
    return len(spec) <= len(shape)


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of a global batch -> the global array, split over `data`."""
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """The global batch must split evenly over the data-parallel devices."""
    if global_batch_size % mesh.shape[DATA]:
        raise ValueError(f"config.global_batch_size={global_batch_size} is not divisible by the "
                         f"{mesh.shape[DATA]} data-parallel devices")


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (the inverse of `global_batch`)."""
    shards = {s.index[0].start or 0: np.asarray(s.data) for s in array.addressable_shards}
    return np.concatenate([shards[k] for k in sorted(shards)], axis=0)
