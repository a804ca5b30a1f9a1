"""The generator training step against the official release's, at the `tiny_linear` fixture's size, on 1 CPU device.

The step is the trainer's own: `build_run(config)` (model, Adam, LPIPS loaded from a `.npz` through
`loss.lpips_path`, a born-sharded state) and the same `jax.jit(train_step, ..., donate_argnums=(0,))` that
`train_and_evaluate` builds. Configuration, as the team measured the release (see
../shared/notes/official_vqgan_lc.md, last section): ddconfig of `tiny_linear` (32 px, ch 32, ch_mult [1, 2],
one res block, z_channels 16, attention at 16), embed_dim D' = 8, linear projector, batch 16, a frozen codebook
of dimension 768 with N codes, L1 + quantization (x0.1) + LPIPS loss, Adam; no GAN (`use_gan=False`). A row with
the GAN on (PatchGAN update + adaptive weight) is printed for information; the release was not measured with it.

The codebook is Gaussian (`codebook_init="random"`) and the LPIPS weights are random (written to a temporary .npz
and loaded by the trainer's path): speed does not depend on either, the loss values are meaningless.

Two speed-ups this benchmark found are in the library now: LPIPS 3x3 convs on maps smaller than the kernel as
im2col + matmul (`models.lpips.Conv3x3`; XLA:CPU's convolution ran the 2x2 maps of the last VGG slice at 32 px at
well under 1 GFLOP/s), and the `fold` nearest-code search (`quantizers.search`, chosen by `method="auto"` on CPU)
in place of XLA:CPU's slow variadic (min, argmin) reduction. The breakdown times the older forms for reference.

Reported: compile time of the step, images/s = batch / median step time (timed steps after warm-up steps, each
ended by block_until_ready), and (unless --no-breakdown) the quantizer's parts timed alone (projecting the N x 768
codebook, the library's search, its `reduce` form, the release's matmul-form search, the whole quantizer forward +
backward) and LPIPS forward + backward alone, with the convolution-only VGG trunk (before `Conv3x3`) for reference.

    python benchmarks/train_step.py                  # N in {16384, 100000}, 10 timed steps each (~25 min here)
    python benchmarks/train_step.py --quick          # smoke run: N=4096, 2 timed steps, library step only
    python benchmarks/train_step.py --codes 100000 --steps 5 --no-gan

Timings on a shared machine are noisy: run it a few times and compare medians.
"""

from __future__ import annotations

import os

# One CPU device unless the caller chose otherwise (must happen before jax is imported).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()

import argparse
import contextlib
import functools
import json
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FIXTURE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_vqgan_lc"
           / "tiny_linear.json")
# The fixture's ddconfig and embed_dim, used when the fixture file is not at hand.
TINY_DDCONFIG = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,), "dropout": 0.0}
TINY_EMBED_DIM = 8
# images/s of the official generator step, torch 2.13 CPU, 2 threads, same configuration (measured by the team).
OFFICIAL_IMAGES_PER_SEC = {16_384: 11.0, 100_000: 3.8}
# Step variants.
LIBRARY = "generator (no GAN)"
GAN = "generator + GAN (D update, adaptive weight), for information"
VARIANTS = {LIBRARY: False, GAN: True}  # name -> use_gan


def tiny_model_config() -> tuple[dict, int]:
    if FIXTURE.is_file():
        fixture = json.loads(FIXTURE.read_text())
        return dict(fixture["ddconfig"]), int(fixture["embed_dim"])
    return dict(TINY_DDCONFIG), TINY_EMBED_DIM


def make_config(num_codes: int, batch: int, codebook_dim: int, chunk_size: int, lpips_path: str):
    from vqlc_jax.train.config import base_config

    ddconfig, embed_dim = tiny_model_config()
    c = base_config()
    c.global_batch_size = batch
    c.total_steps = 10_000
    c.optimizer.warmup_steps = 100
    c.data.resolution = int(ddconfig["resolution"])
    c.model.ddconfig.update({k: tuple(v) if isinstance(v, list) else v for k, v in ddconfig.items()})
    c.model.embed_dim = embed_dim
    c.model.quantizer.update({"name": "lc", "num_codes": num_codes, "codebook_dim": codebook_dim,
                              "projector": "linear", "chunk_size": chunk_size})
    c.codebook_init = "random"
    c.loss.lpips_path = lpips_path
    return c


def write_random_lpips(path: pathlib.Path) -> None:
    """Randomly initialised LPIPS variables, stored where the trainer reads them (speed only: not the real weights)."""
    from vqlc_jax.convert.lpips_weights import save_lpips_variables
    from vqlc_jax.models.lpips import LPIPS

    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    save_lpips_variables(jax.device_get(LPIPS().init(jax.random.key(1), x, x)), path)


@contextlib.contextmanager
def _convolution_only_vgg():
    """Makes `models.lpips` build its VGG trunk from plain nn.Conv (the library before `Conv3x3`), for the LPIPS
    reference row only."""
    from vqlc_jax.models import lpips

    original = lpips.Conv3x3
    lpips.Conv3x3 = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)))
    try:
        yield
    finally:
        lpips.Conv3x3 = original


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def bench_step(num_codes: int, variant: str, args: argparse.Namespace, lpips_path: str) -> dict:
    """Compile seconds, step seconds (all timed steps), temp memory of the trainer's jitted step."""
    from vqlc_jax import parallel
    from vqlc_jax.train.steps import train_step
    from vqlc_jax.train.trainer import build_run

    config = make_config(num_codes, args.batch, args.codebook_dim, args.chunk_size, lpips_path)
    use_gan = VARIANTS[variant]
    run = build_run(config)
    state = run.init_state()
    rng = np.random.default_rng(args.seed)
    res = config.data.resolution
    images_sharding = parallel.batch_sharding(run.mesh)
    images = parallel.global_batch(rng.uniform(-1, 1, (args.batch, res, res, 3)).astype(np.float32), images_sharding)
    # The trainer's jit (train_and_evaluate), state donated.
    step = jax.jit(
        lambda s, x, lp: train_step(run.fns, s, x, lp, use_gan=use_gan),
        in_shardings=(run.state_shardings, images_sharding, parallel.replicated(run.mesh)),
        out_shardings=(run.state_shardings, parallel.replicated(run.mesh)),
        donate_argnums=(0,))
    with jax.set_mesh(run.mesh):
        start = time.perf_counter()
        compiled = step.lower(state, images, run.lpips_vars).compile()
        compile_s = time.perf_counter() - start
        analysis = compiled.memory_analysis()
        temp = None if analysis is None else int(analysis.temp_size_in_bytes)

        holder = {"state": state}

        def one_step():
            holder["state"], metrics = compiled(holder["state"], images, run.lpips_vars)
            return metrics

        times = time_calls(one_step, args.warmup, args.steps)
        metrics = jax.device_get(one_step())
    if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss at N={num_codes}: {metrics}")
    return {"compile_s": compile_s, "times": times, "temp": temp, "state": holder["state"], "run": run}


def bench_quantizer(run, state, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms of the quantizer's parts alone, on the latents' shape of a batch (T = batch * h * w tokens), and
    whether the alternative searches agree with `nearest_codes`."""
    from vqlc_jax.quantizers import nearest_codes

    quantizer = run.fns.model.quantizer.clone(parent=None)
    params = jax.device_get(state.params["quantizer"])
    codebook = jax.device_get(state.model_state["codebook"]["quantizer"])
    variables = {"params": params, "codebook": codebook}
    factor = 2 ** (len(run.config.model.ddconfig.ch_mult) - 1)
    side = run.config.data.resolution // factor
    rng = np.random.default_rng(args.seed)
    z = jnp.asarray(rng.standard_normal((args.batch, side, side, quantizer.embed_dim), np.float32) * 0.5)
    g = jnp.asarray(rng.standard_normal(z.shape, np.float32))
    table = jax.jit(lambda v: quantizer.apply(v, method="search_table"))(variables)
    flat = z.reshape(-1, z.shape[-1])

    def fwd_bwd(v, z):
        def loss(p, z):
            zq, _, aux = quantizer.apply({**v, "params": p}, z)
            return jnp.sum(zq * g) + aux["quant_loss"]
        return jax.grad(loss, argnums=(0, 1))(v["params"], z)

    def dot_search(z, table, chunk):
        """The release's |z|^2 + |e|^2 - 2 z.e (|z|^2 dropped: it does not change the argmin), chunked."""
        n = table.shape[0]
        chunk = min(chunk, n)
        k = -(-n // chunk)
        padded = jnp.pad(table, ((0, k * chunk - n), (0, 0)), constant_values=1e30).reshape(k, chunk, -1)

        def body(carry, xs):
            best_d, best_i = carry
            tab, start = xs
            d = jnp.sum(tab * tab, axis=1) - 2.0 * jnp.dot(z, tab.T, precision=jax.lax.Precision.HIGHEST)
            i = jnp.argmin(d, axis=1).astype(jnp.int32)
            dmin = jnp.min(d, axis=1)
            better = dmin < best_d
            return (jnp.where(better, dmin, best_d), jnp.where(better, i + start, best_i)), None

        init = (jnp.full(z.shape[:1], jnp.inf), jnp.zeros(z.shape[:1], jnp.int32))
        (_, idx), _ = jax.lax.scan(body, init, (padded, jnp.arange(k, dtype=jnp.int32) * chunk))
        return idx

    parts = {
        "project codebook (N x 768 -> 8)": (jax.jit(lambda v: quantizer.apply(v, method="search_table")), (variables,)),
        "search (nearest_codes, method auto)": (
            jax.jit(functools.partial(nearest_codes, chunk_size=args.chunk_size)), (flat, table)),
        "search, method reduce (fused min/argmin per chunk)": (
            jax.jit(functools.partial(nearest_codes, chunk_size=args.chunk_size, method="reduce")), (flat, table)),
        "release's search: |e|^2 - 2 z.e matmul + argmin": (
            jax.jit(functools.partial(dot_search, chunk=args.chunk_size)), (flat, table)),
        "quantizer fwd + bwd (all of it)": (jax.jit(fwd_bwd), (variables, z)),
    }
    out = {}
    for name, (fn, fn_args) in parts.items():
        out[name] = statistics.median(time_calls(functools.partial(fn, *fn_args), 1, args.repeats)) * 1e3
    ref_idx, ref_dist = parts["search (nearest_codes, method auto)"][0](flat, table)
    red_idx, red_dist = parts["search, method reduce (fused min/argmin per chunk)"][0](flat, table)
    alt_idx = parts["release's search: |e|^2 - 2 z.e matmul + argmin"][0](flat, table)
    agreement = {
        "release's search (matmul): same indices": f"{float(np.mean(np.asarray(ref_idx) == np.asarray(alt_idx))):.2%}",
        "auto vs reduce: same indices, bitwise same distances": str(bool(
            np.array_equal(np.asarray(ref_idx), np.asarray(red_idx))
            and np.array_equal(np.asarray(ref_dist).view(np.uint32), np.asarray(red_dist).view(np.uint32)))),
    }
    return out, agreement


def bench_lpips(run, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Median ms of LPIPS forward + gradient w.r.t. the reconstruction (what the step needs), the library's and the
    convolution-only trunk's, and the largest relative difference between the two (value and gradient)."""
    from vqlc_jax.models.lpips import LPIPS

    res = run.config.data.resolution
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.uniform(-1, 1, (args.batch, res, res, 3)).astype(np.float32))
    y = jnp.asarray(rng.uniform(-1, 1, (args.batch, res, res, 3)).astype(np.float32))
    out, grads = {}, {}
    for name, context in (("library (models.lpips.LPIPS, Conv3x3)", contextlib.nullcontext()),
                          ("convolution-only VGG trunk (the library before Conv3x3)", _convolution_only_vgg())):
        with context:
            fn = jax.jit(jax.value_and_grad(lambda v, a, b: jnp.mean(LPIPS().apply(v, a, b)), argnums=2))
            call = functools.partial(fn, run.lpips_vars, x, y)
            out[name] = statistics.median(time_calls(call, 1, args.repeats)) * 1e3
            grads[name] = fn(run.lpips_vars, x, y)
    (v0, g0), (v1, g1) = grads.values()
    rel = max(float(abs(v1 - v0) / abs(v0)), float(jnp.max(jnp.abs(g1 - g0)) / jnp.max(jnp.abs(g0))))
    return out, rel


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, nargs="+", default=[16_384, 100_000], help="codebook sizes N")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--codebook-dim", type=int, default=768)
    parser.add_argument("--chunk-size", type=int, default=16_384, help="codes per search chunk (the config default)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per breakdown part (median)")
    parser.add_argument("--no-gan", action="store_true", help="skip the GAN-on rows")
    parser.add_argument("--no-breakdown", action="store_true", help="skip timing the quantizer's parts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=4096, 1 warm-up, 2 timed steps, only the no-GAN row, no breakdown")
    args = parser.parse_args(argv)
    if args.quick:
        args.codes, args.warmup, args.steps, args.repeats = [4096], 1, 2, 2
        args.no_gan = args.no_breakdown = True
    return args


def _mb(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.0f}"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = jax.devices()[0]
    ddconfig, embed_dim = tiny_model_config()
    print(f"jax {jax.__version__}, {jax.device_count()} device(s): {device.platform} ({device.device_kind}), "
          f"{os.cpu_count()} CPU cores visible; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"tiny_linear ddconfig (res {ddconfig['resolution']}, ch {ddconfig['ch']}, "
          f"ch_mult {list(ddconfig['ch_mult'])}, z_channels {ddconfig['z_channels']}), D'={embed_dim}, "
          f"batch {args.batch}, codebook dim {args.codebook_dim}, chunk {args.chunk_size}; warm-up {args.warmup}, "
          f"timed steps {args.steps}.")
    print("Random LPIPS weights and a Gaussian codebook (speed only; loss values are meaningless).\n")

    rows, breakdowns, lpips_times = [], {}, None
    variants = [LIBRARY] + ([] if args.no_gan else [GAN])
    with tempfile.TemporaryDirectory() as tmp:
        lpips_path = str(pathlib.Path(tmp) / "lpips_random.npz")
        write_random_lpips(pathlib.Path(lpips_path))
        for num_codes in args.codes:
            for variant in variants:
                result = bench_step(num_codes, variant, args, lpips_path)
                times = result["times"]
                r = {"codes": num_codes, "variant": variant, "compile_s": result["compile_s"],
                     "median": statistics.median(times), "spread": (min(times), max(times)), "temp": result["temp"]}
                rows.append(r)
                print(f"  N={num_codes:,} {variant}: compile {r['compile_s']:.1f} s, step median "
                      f"{r['median'] * 1e3:,.0f} ms (min {r['spread'][0] * 1e3:,.0f}, max {r['spread'][1] * 1e3:,.0f})",
                      flush=True)
                if variant == LIBRARY and not args.no_breakdown:
                    breakdowns[num_codes] = bench_quantizer(result["run"], result["state"], args)
                    if lpips_times is None:
                        lpips_times = bench_lpips(result["run"], args)
                del result

    print("\n| N codes | step | ours images/s | release images/s (measured by the team, torch 2.13 CPU 2 threads) "
          "| ours / release | step ms (median) | min-max ms | compile s | temp MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ours = args.batch / r["median"]
        official = OFFICIAL_IMAGES_PER_SEC.get(r["codes"]) if args.batch == 16 else None
        official_s = f"{official:.1f}" if official and r["variant"] != GAN else "-"
        ratio = f"{ours / official:.2f}x" if official and r["variant"] != GAN else "-"
        print(f"| {r['codes']:,} | {r['variant']} | {ours:.2f} | {official_s} | {ratio} | {r['median'] * 1e3:,.0f} | "
              f"{r['spread'][0] * 1e3:,.0f}-{r['spread'][1] * 1e3:,.0f} | {r['compile_s']:.1f} | {_mb(r['temp'])} |")
    print("\nRelease: the official generator step (no GAN), same configuration, measured by the team, torch 2.13 CPU "
          "2 threads (../shared/notes/official_vqgan_lc.md). The release's GAN step was not measured.")

    if breakdowns:
        factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        tokens = args.batch * (ddconfig["resolution"] // factor) ** 2
        print(f"\nQuantizer parts alone (T = {tokens:,} tokens, median of {args.repeats}; ms), next to the whole "
              "step:\n")
        codes = list(breakdowns)
        print("| part | " + " | ".join(f"N={n:,}" for n in codes) + " |")
        print("|---|" + "---:|" * len(codes))
        for name in breakdowns[codes[0]][0]:
            print(f"| {name} | " + " | ".join(f"{breakdowns[n][0][name]:,.1f}" for n in codes) + " |")
        for variant in variants:
            if variant != GAN:
                steps = {r["codes"]: r["median"] for r in rows if r["variant"] == variant}
                print(f"| whole step: {variant} | " + " | ".join(f"{steps[n] * 1e3:,.1f}" for n in codes) + " |")
        for name in breakdowns[codes[0]][1]:
            print(f"| {name} | " + " | ".join(breakdowns[n][1][name] for n in codes) + " |")
    if lpips_times:
        print(f"\nLPIPS forward + gradient w.r.t. the reconstruction, batch {args.batch} at "
              f"{ddconfig['resolution']} px (independent of N; ms, median of {args.repeats}):\n")
        print("| LPIPS | ms |\n|---|---:|")
        times, rel = lpips_times
        for name, ms in times.items():
            print(f"| {name} | {ms:,.1f} |")
        print(f"\nConv3x3 vs convolution only: largest relative difference of LPIPS value and gradient {rel:.1e}.")

if __name__ == "__main__":
    main()
