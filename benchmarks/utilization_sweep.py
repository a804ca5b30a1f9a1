"""Codebook utilization vs codebook size for vq, fc, ema and lc (the paper's Table 1 pattern) on the bundled photos.

Every (method, size) run trains with `train_and_evaluate` from one shared config (configs/sweeps/utilization.py:
same encoder, decoder, data, steps and seed; GAN off), then the table reports, on the whole validation split,
utilization (share of the N codes used at least once), perplexity, PSNR, SSIM and LPIPS, and the utilization over
the training tokens of the last full epoch. The lc methods' frozen codebooks are built first from the train split's
pixel-patch features with the project's codebook pipeline (`vqlc_jax.codebook.build`). Utilization is read against
each codebook's feature-distribution ceiling (`vqlc_jax.analysis.ceiling`: the share of codes that T draws from the
codebook's own build features would hit; T = the validation split's tokens, or one training epoch's), beside the
uniform 1 - exp(-T / N) (a split of T tokens cannot use more than T codes, and at T ~ N even a perfectly even
tokenizer leaves many unused).

Runs live in `WORKDIR/runs/<method>-<N>`, codebooks in `WORKDIR/codebooks/n<N>`; results go to
WORKDIR/utilization_sweep.json and .md (also printed). The sweep resumes: a codebook or run whose settings match
what the folder holds is reused (a finished run is skipped, an interrupted one continues from its checkpoint), any
other is redone from scratch. SIGTERM (e.g. `timeout`) stops the running run at a checkpoint; the sweep then names
it, writes the finished rows and exits; the same command resumes it.

    nice -n 5 python benchmarks/utilization_sweep.py                  # 5 methods x N in {1024, 16384, 100000}
    python benchmarks/utilization_sweep.py --quick                    # 1-2 minute smoke run
    python benchmarks/utilization_sweep.py --methods lc vq --sizes 100000 --steps 600
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from vqlc_jax.analysis import ceiling
from vqlc_jax.analysis.sweeps import parse_key_value
from vqlc_jax.train.loop import Preemption

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP_CONFIG = PROJECT_ROOT / "configs" / "sweeps" / "utilization.py"
CODEBOOK_INFO = "sweep_codebook.json"  # a codebook folder's build settings and notes
RUN_CONFIG, RUN_ROW = "sweep_config.json", "sweep_row.json"  # a run's trainer config; its row once finished
RUN_WALL = "sweep_wall_s.json"  # wall seconds of a run's interrupted parts
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
def _json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def build_codebook(config: ml_collections.ConfigDict, num_codes: int, rows_per_code: int,
                   directory: pathlib.Path) -> dict[str, Any]:
    """Builds directory/codebook.npy [num_codes, D] from the train split's features with `vqlc_jax.codebook.build`:
    global k-means when the features hold >= rows_per_code rows per code, else a random selection of feature rows
    with distinct values. The features are extracted once into the sweep's codebooks folder, shared by all sizes
    (`analysis.sweeps.build_codebook`). Returns what the table notes need; a folder already built with the same
    settings is reused (its notes read back), any other is rebuilt."""
    from vqlc_jax.analysis import sweeps
    from vqlc_jax.codebook import build, extract

    settings = _json_key({"codebook": config.to_dict(), "num_codes": num_codes, "rows_per_code": rows_per_code})
    info_path = directory / CODEBOOK_INFO
    if info_path.is_file() and (directory / sweeps.CODEBOOK_FILE).is_file():
        info = json.loads(info_path.read_text())
        if info.pop("settings") == settings:
            return info
    shutil.rmtree(directory, ignore_errors=True)
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
    codebook = np.load(directory / sweeps.CODEBOOK_FILE)
    info = {"num_codes": num_codes, "path": str(directory / sweeps.CODEBOOK_FILE), "method": method,
            "feature_rows": len(rows), "distinct_feature_rows": len(np.unique(rows, axis=0)),
            "distinct_codes": len(np.unique(codebook, axis=0)), "seconds": time.perf_counter() - start}
    info_path.write_text(json.dumps({**info, "settings": settings}, indent=1))
    return info


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
            "bound": min(1.0, tokens / len(counts)), "uniform": float(ceiling.uniform(len(counts), tokens))}


class SweepPreemption(Preemption):
    """SIGTERM -> `requested` for the whole sweep: the trainer calls `restore()` after every run, which here keeps
    the handler (so a signal between runs stops the sweep too); `close()` puts the previous handler back."""

    def restore(self):
        pass

    def close(self):
        super().restore()


def _last_checkpoint(workdir: pathlib.Path) -> int | None:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=None)


def train_run(config: ml_collections.ConfigDict, method: str, workdir: pathlib.Path,
              preemption: Any = None) -> dict[str, Any]:
    """Trains and evaluates one run; its row of the table. A finished run of the same config in `workdir` is read
    back, an interrupted one resumed from its checkpoint, anything else removed first. `preemption` goes to the
    trainer (default: its SIGTERM handler); a stopped run returns {method, num_codes, status, checkpoint step}."""
    from vqlc_jax.train.trainer import train_and_evaluate

    settings = _json_key(config.to_dict())
    same = (workdir / RUN_CONFIG).is_file() and (workdir / RUN_CONFIG).read_text() == settings
    if same and (workdir / RUN_ROW).is_file():
        return json.loads((workdir / RUN_ROW).read_text())
    if not same or _last_checkpoint(workdir) is None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        (workdir / RUN_CONFIG).write_text(settings)
    earlier = json.loads((workdir / RUN_WALL).read_text()) if (workdir / RUN_WALL).is_file() else 0.0
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir, preemption=preemption)
    wall = earlier + time.perf_counter() - start
    if result["status"] != "done":
        (workdir / RUN_WALL).write_text(json.dumps(wall))
        return {"method": method, "num_codes": config.model.quantizer.num_codes, "status": result["status"],
                "checkpoint_step": _last_checkpoint(workdir), "workdir": str(workdir)}
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if "epoch" in line]
    rates = [line["steps_per_sec"] for line in lines if "steps_per_sec" in line][1:]  # [0] holds the compilation
    row = {
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
    (workdir / RUN_ROW).write_text(json.dumps(row, indent=1))
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if x >= 0.001 else f"{100 * x:.2f}"


def _ratio(util: float, reference: dict[str, float] | None) -> str:
    return f"{util / reference['ceiling']:.3f}" if reference else "n/a"


def _reference(reference: dict[str, float] | None, uniform: float) -> str:
    return f"{_pct(reference['ceiling'])} ({_pct(uniform)})" if reference else f"n/a ({_pct(uniform)})"


def interruption(row: dict[str, Any]) -> str:
    """What to say of the run a SIGTERM stopped."""
    step = row["checkpoint_step"]
    where = f"at step {step} (checkpoint kept)" if step else "before its first checkpoint"
    return (f"Interrupted: run {row['run']} stopped {where} in {row['workdir']}; run the same command again to "
            "resume it (finished runs are skipped).")


def markdown(report: dict[str, Any]) -> str:
    """The table and its notes."""
    s = report["settings"]
    ceilings = {c["num_codes"]: c["ceiling"]["splits"] for c in report["codebooks"]}
    head = ("| method | N | val util % | val ceiling % (uniform %) | val util / ceiling | val perplexity | "
            "train util %, last epoch | epoch ceiling % (uniform %) | train util / ceiling | PSNR | SSIM | LPIPS | "
            "steps | wall s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    tokens = report["tokens"]
    for r in report["runs"]:
        v, t, c = r["val"], r["train_last_epoch"], ceilings.get(r["num_codes"], {})
        epoch = _reference(c.get("epoch"), float(ceiling.uniform(r["num_codes"], tokens["epoch"])))
        train = (f"{_pct(t['utilization'])} | {epoch} | {_ratio(t['utilization'], c.get('epoch'))}" if t else
                 f"n/a (no full epoch) | {epoch} | n/a")
        lpips = f"{r['lpips']:.4f}" if r["lpips"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['num_codes']:,} | {_pct(v['utilization'])} | "
                     f"{_reference(c.get('val'), v['uniform'])} | {_ratio(v['utilization'], c.get('val'))} | "
                     f"{v['perplexity']:,.1f} | {train} | {r['psnr']:.2f} | {r['ssim']:.4f} | {lpips} | "
                     f"{r['steps']} | {r['wall_s']:.0f} |")
    val = report["runs"][0]["val"] if report["runs"] else None
    val_tokens = f" ({val['images']} images x {val['tokens'] // val['images']} tokens)" if val else ""
    codebooks = "; ".join(
        f"N={c['num_codes']:,}: {c['method']}, {c['feature_rows']:,} rows ({c['distinct_feature_rows']:,} distinct), "
        f"{c['distinct_codes']:,} distinct codes, {c['ceiling']['nonempty_cells']:,} non-empty cells, "
        f"{c['seconds']:.0f} s" for c in report["codebooks"]) or "none"
    loads = [r["load_average_5min"] for r in report["runs"]]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    notes = [
        "",
        (f"Setup: {s['model']}; batch {s['batch_size']}, {s['steps']} steps, lr {s['lr']} (warm-up "
         f"{s['warmup_steps']}, cosine), seed {s['seed']}, same data order for every run; GAN off (disc_start = "
         f"total_steps); reconstruction l1 + quantization loss (weight {s['quant_weight']}). Quantizer options: "
         f"{s['quantizers']}; lc methods: frozen codebook."
         + "".join(f" Overrides of the {part} config: {o}." for part, o in report.get("overrides", {}).items() if o)),
        (f"Utilization = share of the N codes used at least once: val over the validation split{val_tokens}, "
         f"T = {tokens['val']:,} tokens; train, last epoch over the training batches of the last full epoch, "
         f"T = {tokens['epoch']:,} tokens, the model still training. Ceiling = the feature-distribution ceiling of "
         "the N-code lc codebook (`python -m vqlc_jax.analysis ceiling`): every codebook-build feature row given to "
         "its nearest code, cells of n_i of R rows, mean_i 1 - (1 - n_i / R)^T, the share of codes that T tokens "
         "following the codebook's own features would use; util / ceiling = util / that ceiling (for vq, fc and ema, "
         "which do not use this codebook, it is the reference for a data-driven codebook of that N). uniform = 1 - "
         "exp(-T / N), i.i.d. uniform draws (no tokenizer exceeds min(1, T / N)). The paper counts 12.8M validation "
         "tokens (both references ~100% at N = 100,000)."),
        f"LPIPS: {s['lpips']}",
        f"lc codebooks (bundled train split, pixel-patch features: {s['codebook_features']}): {codebooks}.",
        f"Reference, {PAPER}.",
        (f"Wall time: {report['total_wall_s'] / 60:.1f} min in all (codebooks and ceilings "
         f"{report['codebook_wall_s']:.0f} s); wall s per run includes compilation and the evaluation (and sums the "
         f"parts of an interrupted run). {report['machine']}, {os.cpu_count()} cores; 5-minute load average after "
         f"the runs: {load}."),
    ]
    if "interrupted" in report:
        notes.append(interruption(report["interrupted"]) + " The table lists the finished runs.")
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


def main(argv: Sequence[str] | None = None, *, preemption: Any = None) -> dict[str, Any]:
    """Runs the sweep (module docstring); returns the report. `preemption`: an object whose `requested` flag stops
    the sweep (read before each run, and by the trainer after each step; default: SIGTERM)."""
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
    tokens = ceiling.split_tokens(sweep.train)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{device.platform} ({device.device_kind}) x {jax.device_count()}",
        "settings": settings(sweep), "overrides": {"train": dict(args.set), "codebook": dict(args.codebook_set)},
        "tokens": tokens, "codebooks": [], "runs": [], "paper": PAPER}
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def save() -> None:
        report["total_wall_s"] = time.perf_counter() - start
        (args.workdir / "utilization_sweep.json").write_text(json.dumps(report, indent=1))

    paths = {}
    if any(uses_codebook(sweep, m) for m in methods):
        for n in sizes:
            directory = args.workdir / "codebooks" / f"n{n}"
            info = build_codebook(sweep.codebook, n, sweep.kmeans_rows_per_code, directory)
            info["ceiling"] = ceiling.summary(ceiling.directory_cell_counts(directory), tokens)
            report["codebooks"].append(info)
            paths[n] = info["path"]
            splits = info["ceiling"]["splits"]
            print(f"codebook N={n:,}: {info['method']}, {info['distinct_codes']:,} distinct codes, "
                  f"{info['seconds']:.0f} s; ceiling {_pct(splits['val']['ceiling'])}% for the validation split, "
                  f"{_pct(splits['epoch']['ceiling'])}% for an epoch", flush=True)
    report["codebook_wall_s"] = time.perf_counter() - start
    save()
    own_handler = preemption is None
    preemption = SweepPreemption() if own_handler else preemption
    try:
        for n, method in ((n, m) for n in sizes for m in methods):
            run_dir = args.workdir / "runs" / f"{method}-{n}"
            if not preemption.requested:
                row = train_run(run_config(sweep, method, n, paths.get(n)), method, run_dir, preemption)
            else:  # stopped between runs
                row = {"method": method, "num_codes": n, "status": "preempted",
                       "checkpoint_step": _last_checkpoint(run_dir), "workdir": str(run_dir)}
            if row["status"] != "done":
                report["interrupted"] = {"run": f"{method}-{n}", **row}
                break
            report["runs"].append(row)
            save()
            print(f"{method} N={n:,}: val util {_pct(row['val']['utilization'])}%, PSNR {row['psnr']:.2f}, "
                  f"{row['wall_s']:.0f} s [{(time.perf_counter() - start) / 60:.1f} min]", flush=True)
    finally:
        if own_handler:
            preemption.close()
    save()
    table = markdown(report)
    (args.workdir / "utilization_sweep.md").write_text(table)
    print("\n" + table)
    print(f"Wrote {args.workdir / 'utilization_sweep.json'} and {args.workdir / 'utilization_sweep.md'}")
    if "interrupted" in report:
        print(interruption(report["interrupted"]), flush=True)
    return report


if __name__ == "__main__":
    main()
