"""Gathers, scatters and iotas that also type-check under explicit sharding.

On a mesh with `Explicit` axes (the default of `jax.make_mesh`), JAX asks for the output sharding of gathers and
scatters whose operands are sharded differently, e.g. codes looked up with a batch-sharded index array. These helpers
give it: outputs of lookups follow the indices, per-code tables are replicated (so a scatter over a sharded batch
sums over all devices). Without explicit axes (no mesh, or `Auto` axes) they are the plain jnp ops. Explicit meshes
need the caller's mesh context (`jax.set_mesh`), as the trainer sets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array


def _explicit_spec(x: Array) -> tuple[jax.sharding.AbstractMesh, PartitionSpec] | None:
    """(mesh, spec) of x when it is typed on a mesh with explicit axes, else None."""
    sharding = jax.typeof(x).sharding
    if not sharding.mesh.explicit_axes:
        return None
    return sharding.mesh, sharding.spec


def replicate(x: Array) -> Array:
    """x replicated over its explicit mesh (an all-gather); x itself otherwise."""
    explicit = _explicit_spec(x)
    return x if explicit is None else jax.sharding.reshard(x, NamedSharding(explicit[0], PartitionSpec()))


def gather_rows(table: Array, indices: Array) -> Array:
    """table[indices] -> [*indices.shape, *table.shape[1:]], sharded like `indices`."""
    indices = jnp.asarray(indices)
    explicit = _explicit_spec(indices)
    if explicit is None:
        return table[indices]
    mesh, spec = explicit
    full_spec = (*spec, *(None,) * (indices.ndim - len(spec)), *(None,) * (table.ndim - 1))
    return table.at[indices].get(out_sharding=NamedSharding(mesh, PartitionSpec(*full_spec)))


def scatter_add_rows(num_rows: int, indices: Array, updates: Array) -> Array:
    """Sums of `updates` [T, ...] per row index `indices` [T] -> [num_rows, ...], replicated (no one-hot)."""
    table = jnp.zeros((num_rows, *updates.shape[1:]), updates.dtype)
    explicit = _explicit_spec(indices)
    if explicit is None:
        return table.at[indices].add(updates)
    return table.at[indices].add(updates, out_sharding=NamedSharding(explicit[0], PartitionSpec()))


def iota_like(x: Array, dimension: int) -> Array:
    """int32 iota shaped and sharded like x, counting along `dimension`."""
    explicit = _explicit_spec(x)
    sharding = None if explicit is None else NamedSharding(*explicit)
    return jax.lax.broadcasted_iota(jnp.int32, x.shape, dimension, out_sharding=sharding)
