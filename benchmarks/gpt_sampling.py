"""GPT sampling speed: the KV-cache sampler against re-running the whole sequence every step (the release).

Prints a Markdown table of samples/s (compile time excluded, one timed run each after a warm-up) for
- `sample_tokens`: KV cache, the whole loop one compiled program;
- the release's loop: a Python loop whose step i runs the forward on the prefix of length i + 1 (rounded up to a
  multiple of --bucket so that only a few shapes compile), as `VQGANTransformer.sample` does (the buckets add
  about 6% to its work at 256 tokens);
- with --padded, `sample_tokens_no_cache`: the full forward over the fixed-length sequence every step, one compiled
  program (about twice the release's work; the tests' oracle).
The share of tokens equal to the cached sampler's is printed (100% on CPU float32). Weights are random: the numbers
are speed only.

  python benchmarks/gpt_sampling.py              # 4 layers x 256 wide, N = 16,384, batch 8, 16x16 tokens
  python benchmarks/gpt_sampling.py --quick      # small smoke run
  python benchmarks/gpt_sampling.py --padded     # also time sample_tokens_no_cache
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.generators.sampling import filter_logits, sample_tokens, sample_tokens_no_cache
from vqlc_jax.models.gpt import GPT


def make_release_loop(model: GPT, *, top_k: int, bucket: int):
    """The release's sampler: step i re-runs the forward on the sequence so far (padded up to a bucket).
    Returns `loop(variables, rng, labels, num_tokens) -> tokens` and `warm_up(variables, batch, num_tokens)`."""
    forward = jax.jit(lambda v, seq: model.apply(v, seq))
    draw = jax.jit(lambda rng, logits, step: jax.random.categorical(
        jax.random.fold_in(rng, step), filter_logits(logits[:, : model.num_codes], top_k=top_k)))

    def lengths(num_tokens):
        return [min(bucket * math.ceil((step + 1) / bucket), num_tokens) for step in range(num_tokens)]

    def loop(variables, rng, labels, num_tokens):
        seq = np.zeros((len(labels), num_tokens + 1), np.int32)
        seq[:, 0] = model.num_codes + np.asarray(labels)
        for step, length in enumerate(lengths(num_tokens)):
            seq[:, step + 1] = np.asarray(draw(rng, forward(variables, jnp.asarray(seq[:, :length]))[:, step], step))
        return seq[:, 1:]

    def warm_up(variables, rng, batch, num_tokens):
        for length in sorted(set(lengths(num_tokens))):
            logits = forward(variables, jnp.zeros((batch, length), jnp.int32))
        jax.block_until_ready(draw(rng, logits[:, 0], 0))

    return loop, warm_up


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(*args)))
    return time.perf_counter() - start, out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="mingpt", choices=["mingpt", "llamagen"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--codes", type=int, default=16_384, help="N image codes")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=16, help="token map side: grid**2 tokens per sample")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=0, help="0: 10%% of the codes (the paper)")
    parser.add_argument("--bucket", type=int, default=16, help="prefix lengths of the release loop round up to this")
    parser.add_argument("--padded", action="store_true", help="also time `sample_tokens_no_cache`")
    parser.add_argument("--quick", action="store_true", help="2 layers x 64, N = 1,024, 8x8 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.heads, args.codes, args.grid = 2, 64, 4, 1024, 8
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    num_tokens = args.grid ** 2
    top_k = args.top_k or max(1, args.codes // 10)
    model = GPT(num_codes=args.codes, num_classes=args.classes, block_size=num_tokens + 1, num_layers=args.layers,
                num_heads=args.heads, width=args.width, variant=args.variant)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, num_tokens), jnp.int32))
    labels = jnp.arange(args.batch, dtype=jnp.int32) % args.classes
    rng = jax.random.key(1)
    options = dict(num_tokens=num_tokens, top_k=top_k)
    rows = []
    reference = None
    samplers = [("KV cache (`sample_tokens`)", sample_tokens)]
    if args.padded:
        samplers.append(("full re-forward, fixed length (`sample_tokens_no_cache`)", sample_tokens_no_cache))
    for name, sampler in samplers:
        compiled = jax.jit(functools.partial(sampler, model, **options)).lower(variables, rng, labels).compile()
        seconds, tokens = timed(compiled, variables, rng, labels)
        reference = tokens if reference is None else reference
        rows.append((name, seconds, float(np.mean(tokens == reference))))
    loop, warm_up = make_release_loop(model, top_k=top_k, bucket=args.bucket)
    warm_up(variables, rng, args.batch, num_tokens)
    seconds, tokens = timed(loop, variables, rng, labels, num_tokens)
    rows.append((f"release loop (prefix re-forward, buckets of {args.bucket}, Python loop)", seconds,
                 float(np.mean(tokens == reference))))

    params = sum(x.size for x in jax.tree.leaves(variables))
    print(f"GPT {args.variant}: {args.layers} layers x {args.width} wide, {args.heads} heads, N = {args.codes:,} "
          f"codes + {args.classes} classes ({params / 1e6:.1f}M parameters, random weights), {num_tokens} tokens "
          f"({args.grid}x{args.grid}), batch {args.batch}, top-k {top_k}, float32, {jax.devices()[0].platform}; "
          "compile time excluded\n")
    print("| sampler | seconds / batch | samples/s | cache speed-up | tokens equal to the cached sampler's |")
    print("|---|---|---|---|---|")
    cached = rows[0][1]
    for name, seconds, same in rows:
        print(f"| {name} | {seconds:.2f} | {args.batch / seconds:.2f} | {seconds / cached:.1f}x | {same:.1%} |")
    print("\nSame draws on CPU float32 (100%); on GPUs, float32 matmuls run as TF32 by default and the two orders of "
          "summation round differently, so a sample's tokens part ways after the first near-tie.")


if __name__ == "__main__":
    main()
