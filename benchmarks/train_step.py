"""The generator training step, ours against the official release's, timed side by side in one run.

Ours is the trainer's own step: `build_run(config)` (model, Adam, LPIPS loaded from a `.npz` through
`loss.lpips_path`, a born-sharded state) and the same `jax.jit(train_step, ..., donate_argnums=(0,))` that the
trainer builds, on one device. The release's is `../shared/tools/bench_official_step.py` (the official
`VQModel`: encoder, LC quantizer, decoder, L1 + quantization + LPIPS loss, Adam; torch on the GPU when it sees one,
else on CPU with --threads threads), run in a subprocess by the Python that has torch (--torch-python) with the
release's `vqgan-gpt-lc` folder (--official; the release can be fetched from github.com/zh460045050/VQGAN-LC).
The two alternate, round after round (ours, release, ours, release, ...), so that both see the same machine load;
each round gives one ratio, and only those ratios are reported. Without --official only our step is timed.

Configuration: `--model tiny` is the `tiny_linear` fixture's ddconfig (32 px, ch 32, ch_mult [1, 2], one res
block, z_channels 16, attention at 16; D' = 8), `--model f16` the paper's f16 model at 256 px
(`configs/vqgan_lc_imagenet_f16.py`); linear projector, a frozen 768-d codebook of N codes, batch 16, no GAN (the
first phase of training). The codebook is Gaussian and the LPIPS weights random: speed does not depend on them.

Two speed-ups this benchmark found are in the library: LPIPS 3x3 convs on maps smaller than the kernel as im2col +
matmul (`models.lpips.Conv3x3`) and the `fold` nearest-code search on CPU (`quantizers.search`); `--breakdown`
times the quantizer's parts and LPIPS alone next to the older forms.

    python benchmarks/train_step.py --official .release/vqgan-gpt-lc --torch-python /path/to/torch/python
    python benchmarks/train_step.py --codes 100000 --rounds 5 --steps 5 --official ... --torch-python ...
    python benchmarks/train_step.py --quick          # smoke run: N=4096, 2 timed steps, ours only

Timings on a shared machine are noisy: compare the per-round ratios, not single figures.
"""

from __future__ import annotations

import os

# One CPU device unless the caller chose otherwise (must happen before jax is imported).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()

import argparse
import contextlib
import functools
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official_vqgan_lc" / "tiny_linear.json"
OFFICIAL_SCRIPT = ROOT.parent / "shared" / "tools" / "bench_official_step.py"
# The fixture's ddconfig and embed_dim, used when the fixture file is not at hand.
TINY_DDCONFIG = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,), "dropout": 0.0}
TINY_EMBED_DIM = 8
# Step variants.
LIBRARY = "generator (no GAN)"
GAN = "generator + GAN (D update, adaptive weight), for information"
VARIANTS = {LIBRARY: False, GAN: True}  # name -> use_gan


def model_config(name: str) -> tuple[dict, int]:
    """(ddconfig, embed_dim): `tiny` = the `tiny_linear` fixture's, `f16` = configs/vqgan_lc_imagenet_f16.py's."""
    if name == "f16":
        import importlib.util

        spec = importlib.util.spec_from_file_location("f16", ROOT / "configs" / "vqgan_lc_imagenet_f16.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.get_config().model
        return {k: list(v) if isinstance(v, tuple) else v for k, v in model.ddconfig.items()}, int(model.embed_dim)
    if FIXTURE.is_file():
        fixture = json.loads(FIXTURE.read_text())
        return dict(fixture["ddconfig"]), int(fixture["embed_dim"])
    return dict(TINY_DDCONFIG), TINY_EMBED_DIM


def make_config(model: tuple[dict, int], num_codes: int, batch: int, codebook_dim: int, chunk_size: int,
                lpips_path: str):
    from vqlc_jax.train.config import base_config

    ddconfig, embed_dim = model
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


def prepare_step(model: tuple[dict, int], num_codes: int, variant: str, args: argparse.Namespace,
                 lpips_path: str) -> dict:
    """The trainer's jitted step for N codes, compiled: {'call': one step -> metrics, 'compile_s', 'temp', 'run',
    'state' (a callable giving the current state)}."""
    from vqlc_jax import parallel
    from vqlc_jax.train.steps import train_step
    from vqlc_jax.train.trainer import build_run

    config = make_config(model, num_codes, args.batch, args.codebook_dim, args.chunk_size, lpips_path)
    use_gan = VARIANTS[variant]
    run = build_run(config)
    rng = np.random.default_rng(args.seed)
    res = config.data.resolution
    images_sharding = parallel.batch_sharding(run.mesh)
    images = parallel.global_batch(rng.uniform(-1, 1, (args.batch, res, res, 3)).astype(np.float32), images_sharding)
    # The trainer's jit, state donated.
    step = jax.jit(
        lambda s, x, lp: train_step(run.fns, s, x, lp, use_gan=use_gan),
        in_shardings=(run.state_shardings, images_sharding, parallel.replicated(run.mesh)),
        out_shardings=(run.state_shardings, parallel.replicated(run.mesh)),
        donate_argnums=(0,))
    holder = {"state": run.init_state()}
    with jax.set_mesh(run.mesh):
        start = time.perf_counter()
        compiled = step.lower(holder["state"], images, run.lpips_vars).compile()
        compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()

    def call():
        holder["state"], metrics = compiled(holder["state"], images, run.lpips_vars)
        return metrics

    return {"call": call, "compile_s": compile_s, "run": run, "state": lambda: holder["state"],
            "temp": None if analysis is None else int(analysis.temp_size_in_bytes)}


def time_ours(prepared: dict, args: argparse.Namespace) -> float:
    """images/s of one block of timed steps (median step) after the warm-up steps; checks the loss is finite."""
    with jax.set_mesh(prepared["run"].mesh):
        times = time_calls(prepared["call"], args.warmup, args.steps)
        loss = float(jax.device_get(prepared["call"]())["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return args.batch / statistics.median(times)


def time_release(model: tuple[dict, int], num_codes: int, args: argparse.Namespace) -> tuple[float, str]:
    """images/s of the release's step (its script: median of 5 timed steps after 2 warm-ups) and its report line."""
    ddconfig, embed_dim = model
    with tempfile.TemporaryDirectory() as tmp:
        config_path = pathlib.Path(tmp) / "config.json"
        config_path.write_text(json.dumps({"ddconfig": ddconfig, "embed_dim": embed_dim}))
        out = subprocess.run(
            [args.torch_python, str(args.official_script), str(config_path), str(args.batch), str(num_codes),
             str(args.threads)],
            env={**os.environ, "OFFICIAL": str(pathlib.Path(args.official).resolve())},
            capture_output=True, text=True, check=False)
    match = re.search(r"^(official .*: ([0-9.]+) img/s.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"the release's step failed ({args.official_script}, exit {out.returncode}):\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(match.group(2)), match.group(1)


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
    parser.add_argument("--model", choices=["tiny", "f16"], default="tiny", help="ddconfig (see the docstring)")
    parser.add_argument("--codes", type=int, nargs="+", default=[16_384, 100_000], help="codebook sizes N")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--codebook-dim", type=int, default=768)
    parser.add_argument("--chunk-size", type=int, default=16_384, help="codes per search chunk (the config default)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each block of ours")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block of ours (median; the release's "
                        "script times 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations ours / release per N")
    parser.add_argument("--official", help="the release's vqgan-gpt-lc folder: time its step side by side")
    parser.add_argument("--torch-python", default=sys.executable, help="a Python with torch, for the release")
    parser.add_argument("--official-script", default=str(OFFICIAL_SCRIPT), help="the script timing the release")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads for the release")
    parser.add_argument("--gan", action="store_true", help="also time ours with the GAN on (no release figure)")
    parser.add_argument("--breakdown", action="store_true", help="also time the quantizer's parts and LPIPS alone")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per breakdown part (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: N=4096, 1 round, 1 warm-up, 2 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.codes, args.rounds, args.warmup, args.steps, args.repeats = [4096], 1, 1, 2, 2
    if args.official:
        for path, what in ((pathlib.Path(args.official) / "models" / "models_vq.py", "--official"),
                           (pathlib.Path(args.official_script), "--official-script")):
            if not path.is_file():
                parser.error(f"{what}: {path} not found")
    return args


def _mb(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.0f}"


def _spread(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = jax.devices()[0]
    model = model_config(args.model)
    ddconfig = model[0]
    print(f"jax {jax.__version__}, {device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores visible; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"model {args.model}: res {ddconfig['resolution']}, ch {ddconfig['ch']}, ch_mult {list(ddconfig['ch_mult'])}, "
          f"z_channels {ddconfig['z_channels']}, D'={model[1]}; batch {args.batch}, codebook dim {args.codebook_dim}, "
          f"chunk {args.chunk_size}; {args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps.")
    print("Random LPIPS weights and a Gaussian codebook (speed only; loss values are meaningless).\n")

    rows, breakdowns, lpips_times = [], {}, None
    variants = [LIBRARY] + ([GAN] if args.gan else [])
    with tempfile.TemporaryDirectory() as tmp:
        lpips_path = str(pathlib.Path(tmp) / "lpips_random.npz")
        write_random_lpips(pathlib.Path(lpips_path))
        for num_codes in args.codes:
            for variant in variants:
                prepared = prepare_step(model, num_codes, variant, args, lpips_path)
                side_by_side = args.official and variant == LIBRARY
                ours, release = [], []
                for round_ in range(args.rounds):
                    ours.append(time_ours(prepared, args))
                    line = f"  N={num_codes:,} {variant} round {round_ + 1}: ours {ours[-1]:.2f} img/s"
                    if side_by_side:
                        speed, report = time_release(model, num_codes, args)
                        release.append(speed)
                        line += f"; {report}"
                    print(line, flush=True)
                rows.append({"codes": num_codes, "variant": variant, "ours": ours, "release": release,
                             "compile_s": prepared["compile_s"], "temp": prepared["temp"]})
                if variant == LIBRARY and args.breakdown:
                    breakdowns[num_codes] = bench_quantizer(prepared["run"], prepared["state"](), args)
                    if lpips_times is None:
                        lpips_times = bench_lpips(prepared["run"], args)
                del prepared

    print(f"\n| N codes | step | ours images/s | release images/s | ours / release, per round | compile s | temp MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        release = _spread(r["release"], ".2f") if r["release"] else "-"
        ratios = _spread([o / e for o, e in zip(r["ours"], r["release"])], ".2f") + "x" if r["release"] else "-"
        print(f"| {r['codes']:,} | {r['variant']} | {_spread(r['ours'], '.2f')} | {release} | {ratios} | "
              f"{r['compile_s']:.1f} | {_mb(r['temp'])} |")
    print("\nMedian (min-max) over rounds; each round times ours, then the release, on the same machine.")

    if breakdowns:
        factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        tokens = args.batch * (ddconfig["resolution"] // factor) ** 2
        print(f"\nQuantizer parts alone (T = {tokens:,} tokens, median of {args.repeats}; ms):\n")
        codes = list(breakdowns)
        print("| part | " + " | ".join(f"N={n:,}" for n in codes) + " |")
        print("|---|" + "---:|" * len(codes))
        for name in breakdowns[codes[0]][0]:
            print(f"| {name} | " + " | ".join(f"{breakdowns[n][0][name]:,.1f}" for n in codes) + " |")
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
