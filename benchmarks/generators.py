"""Training-step and sampling speed of every generator family at a small size, next to the paper sizes' parameter
counts and forward FLOPs per image. Runs unchanged on CPU, GPU or TPU (all local devices, batch split over them).

    python benchmarks/generators.py [--quick] [--batch 16] [--steps 5]

Small models (the `*_demo` configs' widths) on the f16 tokenizer's shapes: 16x16 token maps of 16,384 codes (GPT)
and 16x16x8 latents (DiT, SiT, LDM), random data, 1,000 classes. Sampling: GPT 256 tokens with the KV cache
(top-k 10%), DiT 50 DDPM steps, SiT 16 Heun steps (32 model calls), LDM 50 DDIM steps, each with guidance (two model
rows per sample); decoding excluded, compile time excluded (one warm-up call). FLOPs: XLA's cost analysis of one
forward pass of the paper model (GPT-24x1024 on 256 tokens with 100,000 codes; DiT-XL/2 and SiT-XL/2 on 16x16x8;
LDM's f16 UNet) for one image, from the lowered program (nothing is compiled or allocated at that size).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from vqlc_jax import parallel  # noqa: E402
from vqlc_jax.generators.config import base_config, latent_demo_config  # noqa: E402
from vqlc_jax.generators.family import make_family  # noqa: E402
from vqlc_jax.generators.generator import DatasetInfo  # noqa: E402
from vqlc_jax.train.generator import GenState, make_optimizer, train_step  # noqa: E402

PAPER_CONFIGS = {"gpt": "gpt_imagenet_lc100k", "dit": "dit_xl2_imagenet_lc100k", "sit": "sit_xl2_imagenet_lc100k",
                 "ldm": "ldm_imagenet_f16_lc100k"}


def dataset_info(num_codes: int) -> DatasetInfo:
    return DatasetInfo(num_codes=num_codes, num_classes=1000, token_shape=(16, 16), latent_shape=(16, 16, 8),
                       latent_mean=(0.0,) * 8, latent_std=(1.0,) * 8)


def small_config(name: str):
    if name == "gpt":
        c = base_config("gpt")
        c.model.update(num_layers=4, num_heads=8, width=256, null_class=True)
        c.loss.update(class_dropout=0.1, chunk_size=4096)
        c.sample.cfg_scale = 2.0
        return c
    c = latent_demo_config(name, None, "benchmarks/generators.py")
    c.sample.steps = {"dit": 50, "sit": 16, "ldm": 50}[name]
    if name == "sit":
        c.sample.ode_method = "heun2"
    return c


def batch_for(family, batch: int, num_codes: int, rng: np.random.Generator) -> dict:
    out = {"label": rng.integers(0, 1000, batch).astype(np.int32)}
    if "tokens" in family.fields:
        out["tokens"] = rng.integers(0, num_codes, (batch, 16, 16)).astype(np.int32)
    else:
        out["latents"] = rng.standard_normal((batch, 16, 16, 8)).astype(np.float32)
    return out


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def small_speeds(name: str, batch: int, steps: int, mesh) -> dict:
    config = small_config(name)
    num_codes = 16_384
    family = make_family(config, dataset_info(num_codes))
    optimizer = make_optimizer(config.optimizer, 1000)
    rows, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    @jax.jit
    def init() -> GenState:
        params = family.init_params(jax.random.key(0))
        return GenState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                        opt_state=optimizer.init(params), rng=jax.random.key(1))

    data = jax.device_put(batch_for(family, batch, num_codes, np.random.default_rng(0)), rows)
    step = jax.jit(lambda s, b: train_step(family, optimizer, config.ema.decay, s, b)[0], donate_argnums=(0,))

    def run_steps(s, b):
        for _ in range(steps):
            s = step(s, b)
        return s

    jax.block_until_ready(run_steps(init(), data))  # compile
    state = jax.block_until_ready(init())
    start = time.perf_counter()
    jax.block_until_ready(run_steps(state, data))
    train_s = (time.perf_counter() - start) / steps
    params = init().params
    sample = jax.jit(lambda p, rng, labels: family.sample(p, rng, labels, config.sample),
                     in_shardings=(replicated, replicated, rows), out_shardings=rows)
    labels = jax.device_put(data["label"], rows)
    sample_s = timed(sample, jax.device_put(params, replicated), jax.random.key(2), labels, repeats=2)
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return {"params": count, "train_images_s": batch / train_s, "sample_images_s": batch / sample_s}


def paper_size(name: str) -> dict:
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{PAPER_CONFIGS[name]}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.remat = False
    family = make_family(config, dataset_info(100_000))
    abstract = jax.eval_shape(family.init_params, jax.random.key(0))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract))
    if name == "gpt":
        idx = jax.ShapeDtypeStruct((1, 256), jnp.int32)
        forward = jax.jit(lambda p, i: family.model.apply({"params": p}, i))
        cost = forward.lower(abstract, idx).cost_analysis()
    else:
        x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32 if name == "sit" else jnp.int32)
        y = jax.ShapeDtypeStruct((1,), jnp.int32)
        forward = jax.jit(lambda p, x, t, y: family.model.apply({"params": p}, x, t, y))
        cost = forward.lower(abstract, x, t, y).cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # some backends give none before compiling
    return {"config": PAPER_CONFIGS[name], "params": count, "gflops": float(cost.get("flops", float("nan"))) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 steps (a smoke run)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=list(PAPER_CONFIGS))
    args = parser.parse_args()
    batch, steps = (8, 2) if args.quick else (args.batch, args.steps)
    mesh = parallel.make_mesh()
    batch = -(-batch // mesh.shape[parallel.DATA]) * mesh.shape[parallel.DATA]
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), batch {batch}, {steps} train steps\n")
    print("| family | small model params | train images/s | sampling images/s | paper config | paper params "
          "| paper GFLOPs / image (forward) |")
    print("|---|---:|---:|---:|---|---:|---:|")
    with jax.set_mesh(mesh):
        for name in args.families:
            small, paper = small_speeds(name, batch, steps, mesh), paper_size(name)
            print(f"| {name} | {small['params'] / 1e6:.1f}M | {small['train_images_s']:.1f} | "
                  f"{small['sample_images_s']:.2f} | {paper['config']} | {paper['params'] / 1e6:.1f}M | "
                  f"{paper['gflops']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
