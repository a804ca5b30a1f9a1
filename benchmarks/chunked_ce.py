"""Cross-entropy over a large vocabulary: `chunked_softmax_cross_entropy` against the plain full-logits loss.

Prints a Markdown table, per vocabulary size N, of forward+backward (value_and_grad in features and kernel, jit):
median time (after a warm-up, block_until_ready; compile excluded), the compiled program's temporary memory (XLA
memory analysis) and the peak process RSS growth while compiling and running it. Each case runs in its own
subprocess so that the RSS peaks do not mix. The plain loss is skipped where its compiled program (temporaries,
arguments and outputs) would need more than --plain-limit-gb; the table then gives that size.

  python benchmarks/chunked_ce.py            # T = 4 x 256 tokens, D = 256, N in {16384, 100000, 1000000}:
                                             # ~10 min on a shared 2-core CPU (the N = 1M cases), ~13 GB peak
  python benchmarks/chunked_ce.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqlc_jax.losses import chunked_softmax_cross_entropy

GIB = 2**30


def plain_loss(features: jax.Array, kernel: jax.Array, targets: jax.Array) -> jax.Array:
    """The full [T, N] logits, then optax's mean cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(features @ kernel, targets).mean()


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_case(kind: str, codes: int, args: argparse.Namespace) -> dict:
    """Compiles and times one case in this process; returns its measurements."""
    rng = np.random.default_rng(args.seed)
    features = jnp.asarray(rng.standard_normal((args.tokens, args.dim), np.float32))
    kernel = jnp.asarray(rng.standard_normal((args.dim, codes), np.float32) * 0.02)
    targets = jnp.asarray(rng.integers(0, codes, args.tokens, dtype=np.int32))
    if kind == "plain":
        loss = plain_loss
    else:
        def loss(f, k, t):
            return chunked_softmax_cross_entropy(f, k, t, chunk_size=args.chunk_size)
    baseline = _rss_bytes()
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(features, kernel, targets).compile()
    analysis = compiled.memory_analysis()
    needed = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    result = {"temp": analysis.temp_size_in_bytes, "needed": needed}
    if kind == "plain" and needed > args.plain_limit_gb * GIB:
        return result
    value = jax.block_until_ready(compiled(features, kernel, targets))[0]  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(features, kernel, targets))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {**result, "seconds": statistics.median(times), "rss_delta": peak - baseline, "loss": float(value)}


def _in_subprocess(kind: str, codes: int, argv: Sequence[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--case", f"{kind}:{codes}"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.0f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, nargs="+", default=[16384, 100_000, 1_000_000], help="vocabulary N")
    parser.add_argument("--tokens", type=int, default=4 * 256, help="tokens per batch T (4 x 256)")
    parser.add_argument("--dim", type=int, default=256, help="feature width D")
    parser.add_argument("--chunk-size", type=int, default=8192, help="codes per chunk")
    parser.add_argument("--plain-limit-gb", type=float, default=16.0,
                        help="skip the plain loss where its program would need more memory")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: T=256, D=64, N in {4096, 20000}")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: 'kind:codes', run in a subprocess
    args = parser.parse_args(argv)
    if args.quick:
        args.codes, args.tokens, args.dim, args.chunk_size, args.repeats = [4096, 20000], 256, 64, 2048, 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.case:
        kind, codes = args.case.split(":")
        print(json.dumps(run_case(kind, int(codes), args)))
        return
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); T = {args.tokens}, D = {args.dim}, float32, "
          f"chunk = {args.chunk_size}, value_and_grad in features and kernel, median of {args.repeats}\n")
    print("| N | T x N f32 logits MiB | chunked ms | chunked temp MiB | chunked RSS delta MiB "
          "| plain ms | plain temp MiB | plain RSS delta MiB | same loss |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for codes in args.codes:
        chunked = _in_subprocess("chunked", codes, argv)
        plain = _in_subprocess("plain", codes, argv)
        row = [f"{codes:,}", _mib(args.tokens * codes * 4), f"{chunked['seconds'] * 1e3:,.0f}", _mib(chunked["temp"]),
               _mib(chunked["rss_delta"])]
        if "seconds" in plain:
            same = abs(plain["loss"] - chunked["loss"]) / abs(plain["loss"])
            row += [f"{plain['seconds'] * 1e3:,.0f}", _mib(plain["temp"]), _mib(plain["rss_delta"]), f"{same:.1e} rel"]
        else:
            row += [f"does not fit (needs {plain['needed'] / GIB:,.1f} GiB)", _mib(plain["temp"]), "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
    print("\nRSS delta: peak resident memory of the case's process minus its size just before compiling (includes "
          "the compiler's own memory and the gradient outputs).")


if __name__ == "__main__":
    main()
