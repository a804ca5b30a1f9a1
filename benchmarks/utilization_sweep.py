"""Codebook utilization vs codebook size for vq, fc, ema and lc (the paper's Table 1 pattern) on the bundled photos.

Every (method, size) run trains with `train_and_evaluate` from one shared config (configs/sweeps/utilization.py:
same encoder, decoder, data, steps and seed; GAN off), then the table reports, on the whole validation split,
utilization (share of the N codes used at least once), perplexity, PSNR, SSIM and LPIPS, next to the utilization of
i.i.d. uniform code use, 1 - exp(-tokens / N) (a split of T tokens cannot use more than T codes, and at T ~ N even
a perfectly even tokenizer leaves many unused), and the utilization over the training tokens of the last full epoch.
The lc methods' frozen codebooks are built first from the train split's pixel-patch features with the project's
codebook pipeline (`vqlc_jax.codebook.build`). Every run starts from scratch in
`WORKDIR/runs/<method>-<N>`; results go to WORKDIR/utilization_sweep.json and .md (also printed).

    nice -n 5 python benchmarks/utilization_sweep.py                  # 5 methods x N in {1024, 16384, 100000}
    python benchmarks/utilization_sweep.py --quick                    # 1-2 minute smoke run
    python benchmarks/utilization_sweep.py --methods lc vq --sizes 100000 --steps 600
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from vqlc_jax.analysis.sweeps import parse_key_value

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP_CONFIG = PROJECT_ROOT / "configs" / "sweeps" / "utilization.py"
PAPER = ("paper (ImageNet, 50K val images x 256 tokens = 12.8M tokens), 16,384 -> 100,000 codes: "
         "vq 3.4% -> 0.5%, fc 11.2% -> 1.9%, ema 83.2% -> 24.2%, lc 99.9% at both")


def load_sweep(quick: bool, train_overrides: Sequence[tuple[str, Any]] = (),
               codebook_overrides: Sequence[tuple[str, Any]] = ()) -> ml_collections.ConfigDict:
    """configs/sweeps/utilization.py (variant `quick` when asked), with dotted-key overrides of its `train` and
    `codebook` configs (an unknown key raises ValueError naming it)."""
    from vqlc_jax.analysis import sweeps

    sweep = sweeps.load_config_file(f"{SWEEP_CONFIG}:quick" if quick else SWEEP_CONFIG)
    sweep.train = sweeps.apply_overrides(sweep.train, dict(train_overrides), source="--set").unlock()
    sweep.codebook = sweeps.apply_overrides(sweep.codebook, dict(codebook_overrides), source="--codebook-set").unlock()
    return sweep


def set_steps(train: ml_collections.ConfigDict, steps: int) -> None:
    """`steps` of training, evaluated and checkpointed once at the end, the GAN never started."""
    train.total_steps = train.eval_every_steps = train.checkpoint_every_steps = train.loss.disc_start = steps
    train.optimizer.warmup_steps = min(train.optimizer.warmup_steps, steps)


# ----------------------------------------------------------------------------------------------------------------------
# lc codebooks
# ----------------------------------------------------------------------------------------------------------------------
def build_codebook(config: ml_collections.ConfigDict, num_codes: int, rows_per_code: int,
                   directory: pathlib.Path) -> dict[str, Any]:
    """Builds directory/codebook.npy [num_codes, D] from the train split's features with `vqlc_jax.codebook.build`:
    global k-means when the features hold >= rows_per_code rows per code, else a random selection of feature rows
    with distinct values. The features are extracted once into the sweep's codebooks folder, shared by all sizes
    (`analysis.sweeps.build_codebook`). Returns what the table notes need."""
    from vqlc_jax.analysis import sweeps
    from vqlc_jax.codebook import build, extract

    start = time.perf_counter()
    config = copy.deepcopy(config)
    features = sweeps.features_dir(directory.parent.parent, config)  # WORKDIR/codebooks/features-<digest>
    manifest = build.build(config, features, "extract")
    kmeans = manifest["total_rows"] >= rows_per_code * num_codes
    config.codebook.update(mode="global", k=num_codes, method="kmeans" if kmeans else "random_selection")
    sweeps.build_codebook(config, directory, features, build.build)
    method = (f"k-means ({config.kmeans.num_steps} steps of {config.kmeans.batch_size}, init {config.kmeans.init})"
              if kmeans else "random selection of distinct rows")
    shards, _, _ = extract.open_features(features / extract.FEATURES_DIR)
    rows = np.asarray(shards.read(np.arange(shards.num_rows)), np.float32)
    codebook = np.load(directory / "codebook.npy")
    return {"num_codes": num_codes, "path": str(directory / "codebook.npy"), "method": method,
            "feature_rows": len(rows), "distinct_feature_rows": len(np.unique(rows, axis=0)),
            "distinct_codes": len(np.unique(codebook, axis=0)), "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------
def run_config(sweep: ml_collections.ConfigDict, method: str, num_codes: int,
               codebook_path: str | None) -> ml_collections.ConfigDict:
    """The trainer config of one run: the shared `train` config with this quantizer."""
    config = copy.deepcopy(sweep.train)
    options = {"num_codes": num_codes, "chunk_size": min(num_codes, sweep.max_chunk_size),
               **sweep.quantizers[method].to_dict()}
    if uses_codebook(sweep, method):  # keeps the train config's codebook_dim
        config.model.quantizer.update(options)
        config.codebook_path, config.codebook_init = codebook_path, "file"
    else:
        config.model.quantizer = options
    return config


def uses_codebook(sweep: ml_collections.ConfigDict, method: str) -> bool:
    return sweep.quantizers[method].name == "lc"


def _usage(counts: np.ndarray) -> dict[str, float]:
    """Utilization, perplexity and tokens of per-code counts, with the utilization's bound min(1, tokens / N) and
    its value 1 - exp(-tokens / N) under i.i.d. uniform use of the codes."""
    from vqlc_jax.quantizers import perplexity, utilization

    tokens = int(counts.sum())
    return {"utilization": float(utilization(counts)), "perplexity": float(perplexity(counts)), "tokens": tokens,
            "bound": min(1.0, tokens / len(counts)), "uniform": -math.expm1(-tokens / len(counts))}


def train_run(config: ml_collections.ConfigDict, method: str, workdir: pathlib.Path) -> dict[str, Any]:
    """Trains and evaluates one run from scratch; its row of the table."""
    from vqlc_jax.train.trainer import train_and_evaluate

    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if "epoch" in line]
    rates = [line["steps_per_sec"] for line in lines if "steps_per_sec" in line][1:]  # [0] holds the compilation
    return {
        "method": method, "num_codes": config.model.quantizer.num_codes, "status": result["status"],
        "steps": config.total_steps, "wall_s": wall, "steps_per_sec": float(np.mean(rates)) if rates else None,
        "load_average_5min": os.getloadavg()[1],
        "val": {**_usage(np.load(workdir / "eval_code_counts.npy")), "images": int(result["eval/num_images"])},
        "train_last_epoch": ({**_usage(np.load(workdir / "epoch_code_counts.npy")), "epoch": epochs[-1]["epoch"],
                              "last_step": epochs[-1]["step"]} if epochs else None),
        "psnr": result["eval/psnr"], "ssim": result["eval/ssim"], "lpips": result.get("eval/lpips"),
        "eval": {k: v for k, v in result.items() if k.startswith("eval/")},
        "final_train_metrics": {k: v for k, v in result.items() if not k.startswith("eval/")},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if x >= 0.001 else f"{100 * x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The table and its notes."""
    s = report["settings"]
    head = ("| method | N | val util % | uniform % | util / uniform | val perplexity | train util %, last epoch "
            "(uniform %) | PSNR | SSIM | LPIPS | steps | wall s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in report["runs"]:
        v, t = r["val"], r["train_last_epoch"]
        train = f"{_pct(t['utilization'])} ({_pct(t['uniform'])})" if t else "n/a (no full epoch)"
        lpips = f"{r['lpips']:.4f}" if r["lpips"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['num_codes']:,} | {_pct(v['utilization'])} | {_pct(v['uniform'])} | "
                     f"{v['utilization'] / v['uniform']:.3f} | {v['perplexity']:,.1f} | {train} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {lpips} | {r['steps']} | {r['wall_s']:.0f} |")
    val = report["runs"][0]["val"] if report["runs"] else None
    epoch = next((r["train_last_epoch"] for r in report["runs"] if r["train_last_epoch"]), None)
    val_tokens = (f" ({val['images']} images x {val['tokens'] // val['images']} tokens = {val['tokens']:,})"
                  if val else "")
    epoch_tokens = f" ({epoch['tokens']:,} tokens, the model still training)" if epoch else ""
    iid = ", ".join(f"{_pct(v['uniform'])}% at N={n:,}"
                    for n, v in sorted({r["num_codes"]: r["val"] for r in report["runs"]}.items()))
    codebooks = "; ".join(
        f"N={c['num_codes']:,}: {c['method']}, {c['feature_rows']:,} rows ({c['distinct_feature_rows']:,} distinct), "
        f"{c['distinct_codes']:,} distinct codes, {c['seconds']:.0f} s" for c in report["codebooks"]) or "none"
    loads = [r["load_average_5min"] for r in report["runs"]]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    notes = [
        "",
        (f"Setup: {s['model']}; batch {s['batch_size']}, {s['steps']} steps, lr {s['lr']} (warm-up "
         f"{s['warmup_steps']}, cosine), seed {s['seed']}, same data order for every run; GAN off (disc_start = "
         f"total_steps); reconstruction l1 + quantization loss (weight {s['quant_weight']}). Quantizer options: "
         f"{s['quantizers']}; lc methods: frozen codebook."
         + "".join(f" Overrides of the {part} config: {o}." for part, o in report.get("overrides", {}).items() if o)),
        (f"Utilization = share of the N codes used at least once. val: encoding the validation split"
         f"{val_tokens}. uniform = 1 - exp(-tokens / N), the utilization of a tokenizer that draws every token "
         f"i.i.d. uniformly from the N codes ({iid}): the reference for a split this small (no tokenizer can "
         "exceed min(1, tokens / N)); util / uniform = val util / uniform. Train, last epoch: codes used by the "
         f"training batches of the last full epoch{epoch_tokens}. The paper counts 12.8M validation tokens (uniform "
         "100% at N = 100,000)."),
        f"LPIPS: {s['lpips']}",
        f"lc codebooks (bundled train split, pixel-patch features: {s['codebook_features']}): {codebooks}.",
        f"Reference, {PAPER}.",
        (f"Wall time: {report['total_wall_s'] / 60:.1f} min in all (codebooks {report['codebook_wall_s']:.0f} s); "
         f"wall s per run includes compilation and the evaluation. {report['machine']}, {os.cpu_count()} cores; "
         f"5-minute load average after the runs: {load}."),
    ]
    return "\n".join(lines + notes) + "\n"


def settings(sweep: ml_collections.ConfigDict) -> dict[str, Any]:
    """The shared settings, for the JSON and the notes."""
    t, cb = sweep.train, sweep.codebook
    dd = t.model.ddconfig
    lpips = (f"with weights {t.loss.lpips_path}" if t.loss.lpips_path else
             "n/a: no converted LPIPS (VGG16) weights on this machine (train.loss.lpips_path unset), so it is not "
             "evaluated, and the runs trained without the LPIPS loss.")
    side = t.data.resolution // 2 ** (len(dd.ch_mult) - 1)
    return {
        "model": f"{t.data.resolution} px bundled photos, ch {dd.ch}, ch_mult {tuple(dd.ch_mult)}, "
                 f"{dd.num_res_blocks} res block(s), {side}x{side} = {side * side} tokens per image, "
                 f"D' = {t.model.embed_dim}",
        "batch_size": t.global_batch_size, "steps": t.total_steps, "lr": t.optimizer.lr,
        "warmup_steps": t.optimizer.warmup_steps, "seed": t.seed, "quant_weight": t.loss.quant_weight,
        "quantizers": {k: v.to_dict() for k, v in sweep.quantizers.items()}, "lpips": lpips,
        "codebook_features": f"{cb.extractor.patch_size}x{cb.extractor.patch_size} patches "
                             f"{'scaled to their RMS' if cb.extractor.rms_scale else '(raw [-1, 1] values)'} at "
                             f"{cb.data.resolution} "
                             f"px, pool {cb.extractor.pool}, k-means when >= {sweep.kmeans_rows_per_code} rows "
                             "per code",
        "train_config": t.to_dict(), "codebook_config": cb.to_dict(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="codebook sizes (default: the config's)")
    parser.add_argument("--methods", nargs="+", help="methods of the config's `quantizers` (default: its `methods`)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the config's)")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/vqlc_utilization_sweep"))
    parser.add_argument("--lpips-path", default="", help="converted LPIPS weights (.npz): evaluate (and train) with it")
    parser.add_argument("--quick", action="store_true", help="1-2 minute smoke run (tiny model, sizes, steps)")
    parser.add_argument("--set", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override of the runs' trainer config (e.g. loss.quant_weight=1.0)")
    parser.add_argument("--codebook-set", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override of the lc codebooks' build config (e.g. extractor.rms_scale=False)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import jax

    sweep = load_sweep(args.quick, args.set, args.codebook_set)
    sizes, methods = args.sizes or list(sweep.sizes), args.methods or list(sweep.methods)
    unknown = sorted(set(methods) - set(sweep.quantizers))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; {SWEEP_CONFIG.name} defines {sorted(sweep.quantizers)}")
    if args.steps:
        set_steps(sweep.train, args.steps)
    if args.lpips_path:
        sweep.train.loss.lpips_path = args.lpips_path
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{device.platform} ({device.device_kind}) x {jax.device_count()}",
        "settings": settings(sweep), "overrides": {"train": dict(args.set), "codebook": dict(args.codebook_set)},
        "codebooks": [], "runs": [], "paper": PAPER}
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def save() -> None:
        report["total_wall_s"] = time.perf_counter() - start
        (args.workdir / "utilization_sweep.json").write_text(json.dumps(report, indent=1))

    paths = {}
    if any(uses_codebook(sweep, m) for m in methods):
        for n in sizes:
            directory = args.workdir / "codebooks" / f"n{n}"
            shutil.rmtree(directory, ignore_errors=True)
            info = build_codebook(sweep.codebook, n, sweep.kmeans_rows_per_code, directory)
            report["codebooks"].append(info)
            paths[n] = info["path"]
            print(f"codebook N={n:,}: {info['method']}, {info['distinct_codes']:,} distinct codes, "
                  f"{info['seconds']:.0f} s", flush=True)
    report["codebook_wall_s"] = time.perf_counter() - start
    save()
    for n in sizes:
        for method in methods:
            config = run_config(sweep, method, n, paths.get(n))
            row = train_run(config, method, args.workdir / "runs" / f"{method}-{n}")
            report["runs"].append(row)
            save()
            print(f"{method} N={n:,}: val util {_pct(row['val']['utilization'])}% (uniform "
                  f"{_pct(row['val']['uniform'])}%), PSNR {row['psnr']:.2f}, {row['wall_s']:.0f} s "
                  f"[{(time.perf_counter() - start) / 60:.1f} min]", flush=True)
    save()
    table = markdown(report)
    (args.workdir / "utilization_sweep.md").write_text(table)
    print("\n" + table)
    print(f"Wrote {args.workdir / 'utilization_sweep.json'} and {args.workdir / 'utilization_sweep.md'}")
    return report


if __name__ == "__main__":
    main()
