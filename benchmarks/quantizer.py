"""Nearest-code search: chunked `nearest_codes` against the naive full-matrix argmin of the release.

Prints a Markdown table: median time per search (jit, after a warm-up, block_until_ready) and the compiled
program's temporary memory (XLA memory analysis) for each (tokens T, codes N). The naive search builds the whole
[T, N] distance matrix (|z|^2 + |e|^2 - 2 z.e, one dot) and is skipped where that matrix exceeds --naive-limit-gb.

  python benchmarks/quantizer.py            # T in {16384, 65536} x N in {16384, 100000, 1000000}, D' = 8
  python benchmarks/quantizer.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.quantizers import DEFAULT_CHUNK_SIZE, nearest_codes


def naive_nearest(z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The release's search: the full [T, N] squared-distance matrix, then argmin."""
    dist = (jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(codebook * codebook, axis=1)
            - 2.0 * jnp.dot(z, codebook.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(dist, axis=1).astype(jnp.int32), jnp.min(dist, axis=1)


def measure(fn: Callable, args: Sequence[jax.Array], repeats: int) -> tuple[float, int | None, tuple]:
    """(median seconds, temp bytes of the compiled program or None, result) of jit(fn)(*args)."""
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)
    result = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp, result


def _mb(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536], help="latents per search (T)")
    parser.add_argument("--codes", type=int, nargs="+", default=[16384, 100_000, 1_000_000], help="codebook sizes")
    parser.add_argument("--dim", type=int, default=8, help="latent dim D'")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="codes per chunk")
    parser.add_argument("--naive-limit-gb", type=float, default=8.0,
                        help="skip the naive search where its T x N float32 matrix is larger")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: T=1024, N in {4096, 20000}, chunk 4096")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.codes, args.chunk_size, args.repeats = [1024], [4096, 20000], 4096, 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); D' = {args.dim}, "
          f"chunk = {args.chunk_size}, repeats = {args.repeats}\n")
    print("| T | N | chunked ms | chunked temp MB | naive ms | naive temp MB | same indices |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    chunked = functools.partial(nearest_codes, chunk_size=args.chunk_size)
    for tokens in args.tokens:
        for codes in args.codes:
            z = jnp.asarray(rng.standard_normal((tokens, args.dim), np.float32))
            codebook = jnp.asarray(rng.standard_normal((codes, args.dim), np.float32))
            seconds, temp, (idx, _) = measure(chunked, (z, codebook), args.repeats)
            row = [f"{tokens:,}", f"{codes:,}", f"{seconds * 1e3:,.1f}", _mb(temp)]
            if tokens * codes * 4 > args.naive_limit_gb * 2**30:
                row += ["does not fit", f"({tokens * codes * 4 / 2**30:,.0f} GiB matrix)", "-"]
            else:
                naive_seconds, naive_temp, (naive_idx, _) = measure(naive_nearest, (z, codebook), args.repeats)
                same = float(jnp.mean(idx == naive_idx))
                row += [f"{naive_seconds * 1e3:,.1f}", _mb(naive_temp), f"{same:.4%}"]
            print("| " + " | ".join(row) + " |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    print(f"\npeak process RSS over the whole run: {peak:,.0f} MiB. 'same indices' differs from 100% only where two "
          "codes are within float32 rounding of each other (the naive expansion rounds differently).")


if __name__ == "__main__":
    main()
