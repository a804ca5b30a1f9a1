"""Ablation sweeps (Tables 6, 7, 9, 10): one base trainer config, runs that override it, one table of results.

A sweep config (`configs/sweeps/<name>.py`, `get_config(variant)`, started with `new_sweep`) is a ConfigDict:

    name           the table's title
    base           the trainer config, "path[:variant]"; relative paths start at the project root
    codebook_base  the codebook build config of runs that build their own codebook ("" when none do)
    runs           a list of dicts, each with
                     overrides  {dotted key: value}, e.g. {"model.quantizer.num_codes": 256}; a dict value replaces
                                that whole sub-config (e.g. "model.quantizer" for another quantizer)
                     name       optional; default derived from the overrides' last key parts ("num_codes=256";
                                "base" when there are none); required when a value is not a scalar
                     codebook   optional overrides of codebook_base: the run trains (codebook_init="file") on a
                                codebook built with them ({} = codebook_base as it is)
                   (override dicts must sit inside `runs`: a ConfigDict field cannot have dotted keys)

`run_sweep(sweep, workdir)` does, for each run: build its codebook with `vqlc_jax.codebook.build.build` into
`workdir/codebooks/<name>-<digest>` (one folder per distinct codebook config; skipped when its codebook.npy exists,
delete the folder to rebuild; the features are extracted once per distinct data/extractor/extract sections into
`workdir/codebooks/features-<digest>`, which each codebook folder links as its `features`), point `codebook_path`
at it, train with `train_and_evaluate(config, workdir/<run>)`
(which resumes from the run's checkpoints), and write `workdir/<run>/sweep_result.json` (overrides, the returned
final metrics and, for runs on a codebook of their own, its feature-distribution ceiling: `analysis.ceiling`, cells
counted over the codebook's build features and kept in its folder, for the tokens of a training epoch and of the
validation split). A run whose result says "done" is skipped; a run that comes back "preempted" (SIGTERM) stops the
sweep, and the next invocation resumes it. `collect` reads those files back into rows: run name, the run's own
(swept) override values, status ("done", "preempted", or "missing" when not run yet), the final evaluation metrics
and the ceilings (`ceiling_val`, `ceiling_epoch`, and `util_per_ceiling` = validation utilization / ceiling_val);
`sweep_markdown` renders them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from vqlc_jax.analysis.report import markdown_table

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULT_FILE = "sweep_result.json"
CODEBOOKS_DIR = "codebooks"
CODEBOOK_FILE = "codebook.npy"
RUN_KEYS = ("name", "overrides", "codebook")
NAME_PATTERN = r"[A-Za-z0-9_.=+-]+"
# Base configs of the sweep variants: (trainer config, codebook config).
VARIANTS = {
    "demo": ("configs/demo.py", "configs/codebook/demo.py"),
    "imagenet": ("configs/vqgan_lc_imagenet_f16.py", "configs/codebook/imagenet_clip_vitl14.py"),
}
# Table columns: (header, key in the trainer's result, scale).
METRICS = (("utilization %", "eval/utilization", 100.0), ("perplexity", "eval/perplexity", 1.0),
           ("PSNR", "eval/psnr", 1.0), ("PSNR-Y", "eval/psnr_y", 1.0), ("SSIM", "eval/ssim", 1.0),
           ("LPIPS", "eval/lpips", 1.0), ("rFID", "eval/rfid", 1.0))
# Ceiling columns of the table: (header, row key, scale); shown when a run has a ceiling.
CEILING_COLUMNS = (("val ceiling %", "ceiling_val", 100.0), ("util / ceiling", "util_per_ceiling", 1.0),
                   ("epoch ceiling %", "ceiling_epoch", 100.0))
# The codebook config's sections that decide its features (the rest only decides the clustering).
FEATURE_SECTIONS = ("data", "extractor", "extract")
TrainFn = Callable[[ml_collections.ConfigDict, pathlib.Path], Mapping[str, Any]]
BuildFn = Callable[[ml_collections.ConfigDict, pathlib.Path, str], Any]  # (config, workdir, stage) as build.build


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run: its name, the overrides it trains with (its own, then the extra ones), its own overrides (the
    swept values), and the codebook overrides it builds with (None: no codebook of its own)."""

    name: str
    overrides: dict[str, Any]
    swept: dict[str, Any]
    codebook: dict[str, Any] | None = None
    codebook_swept: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Config files and overrides
# ----------------------------------------------------------------------------------------------------------------------
def resolve(path: str | pathlib.Path) -> pathlib.Path:
    """`path` if absolute, else relative to the project root."""
    path = pathlib.Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def load_config_file(spec: str | pathlib.Path) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a config file given as "path.py[:variant]" (as `--config` of the CLIs)."""
    path, _, variant = str(spec).partition(".py:")
    path = pathlib.Path(path if not variant else path + ".py")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return module.get_config(variant or None)


def new_sweep(name: str, variant: str | None, config_file: str) -> ml_collections.ConfigDict:
    """An empty sweep on the base configs of `variant` (a key of VARIANTS, default "demo"); errors name the file."""
    variant = variant or "demo"
    if variant not in VARIANTS:
        raise ValueError(f"{config_file}: unknown variant {variant!r} (choices: {', '.join(VARIANTS)})")
    base, codebook_base = VARIANTS[variant]
    return ml_collections.ConfigDict(dict(name=name, base=base, codebook_base=codebook_base, runs=[]))


def parse_key_value(text: str) -> tuple[str, Any]:
    """"key=value" (a --set argument) -> (key, value); the value is a Python literal when it parses as one, else the
    string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], *,
                    source: str) -> ml_collections.ConfigDict:
    """A locked copy of `config` with the dotted-key `overrides` set; an unknown key or a value of the wrong type
    raises ValueError naming `source` and the key."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    for key, value in overrides.items():
        parts = key.split(".")
        target = config
        for depth, part in enumerate(parts):
            if not isinstance(target, ml_collections.ConfigDict) or part not in target:
                where = ".".join(parts[:depth]) or "the config"
                has = ", ".join(sorted(target)) if isinstance(target, ml_collections.ConfigDict) else "no keys"
                raise ValueError(f"{source}: unknown key {key!r} ({where} has: {has})")
            if depth < len(parts) - 1:
                target = target[part]
        try:
            target[parts[-1]] = value
        except TypeError as err:
            raise ValueError(f"{source}: {key}={value!r}: {err}") from None
    return config


def run_name(overrides: Mapping[str, Any]) -> str:
    """"leaf=value" parts joined by "-" ("base" for no overrides), characters outside [A-Za-z0-9_.=+-] as "_"."""
    parts = []
    for key, value in overrides.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"override {key!r} has a non-scalar value: give the run a name")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts)) or "base"  # NAME_PATTERN's characters


def plan(sweep: ml_collections.ConfigDict, *, overrides: Mapping[str, Any] | None = None,
         codebook_overrides: Mapping[str, Any] | None = None) -> list[SweepRun]:
    """The sweep's runs with their merged overrides: the run's own, then `overrides` (the run's codebook overrides,
    then `codebook_overrides`); checks the run entries and that names are unique."""
    runs = []
    for i, entry in enumerate(sweep.runs):
        where = f"sweep {sweep.name!r}, run {i}"
        if unknown := sorted(set(entry) - set(RUN_KEYS)):
            raise ValueError(f"{where}: unknown entries {unknown} (allowed: {', '.join(RUN_KEYS)})")
        own = dict(entry.get("overrides", {}))
        try:
            name = entry.get("name") or run_name(own)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"{where}: name {name!r} is not a plain folder name ({NAME_PATTERN})")
        codebook = entry.get("codebook")
        if codebook is not None and not sweep.codebook_base:
            raise ValueError(f"{where}: builds a codebook, but the sweep has no codebook_base")
        merged_codebook = None if codebook is None else {**codebook, **(codebook_overrides or {})}
        runs.append(SweepRun(name, {**own, **(overrides or {})}, own, merged_codebook,
                             None if codebook is None else dict(codebook)))
    names = [r.name for r in runs]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"sweep {sweep.name!r}: duplicate run names {duplicates}")
    return runs


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def codebook_dir(workdir: pathlib.Path, run: SweepRun, codebook_base: str) -> pathlib.Path:
    """workdir/codebooks/<readable name of the run's codebook overrides>-<digest of the base and all overrides>."""
    readable = run_name(run.codebook_swept) if run.codebook_swept else "default"
    return workdir / CODEBOOKS_DIR / f"{readable}-{_digest([codebook_base, run.codebook])}"


def features_dir(workdir: pathlib.Path, codebook_config: ml_collections.ConfigDict) -> pathlib.Path:
    """workdir/codebooks/features-<digest of the config's FEATURE_SECTIONS>: shared by codebooks of the same
    features."""
    sections = {key: codebook_config[key].to_dict() for key in FEATURE_SECTIONS}
    return workdir / CODEBOOKS_DIR / f"features-{_digest(sections)}"


def build_codebook(config: ml_collections.ConfigDict, directory: pathlib.Path, features: pathlib.Path,
                   build_fn: BuildFn) -> None:
    """Extracts (or finishes extracting) the features into `features`, links them into `directory` and clusters
    them there."""
    from vqlc_jax.codebook.extract import FEATURES_DIR

    build_fn(config, features, "extract")
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / FEATURES_DIR
    if not link.is_symlink():
        link.symlink_to(features / FEATURES_DIR, target_is_directory=True)
    build_fn(config, directory, "cluster")


# ----------------------------------------------------------------------------------------------------------------------
# Running and collecting
# ----------------------------------------------------------------------------------------------------------------------
def run_sweep(sweep: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
              overrides: Mapping[str, Any] | None = None, codebook_overrides: Mapping[str, Any] | None = None,
              train_fn: TrainFn | None = None, build_fn: BuildFn | None = None) -> list[dict[str, Any]]:
    """Runs every run not yet finished (module docstring); returns `collect`'s rows. `train_fn` and `build_fn`
    default to the trainer's `train_and_evaluate` and the codebook builder's `build`."""
    from vqlc_jax.analysis import ceiling

    if train_fn is None:
        from vqlc_jax.train.trainer import train_and_evaluate as train_fn
    if build_fn is None:
        from vqlc_jax.codebook.build import build as build_fn
    workdir = pathlib.Path(workdir).absolute()
    runs = plan(sweep, overrides=overrides, codebook_overrides=codebook_overrides)
    base = load_config_file(resolve(sweep.base))
    for run in runs:
        run_dir = workdir / run.name
        if _status(_record(run_dir / RESULT_FILE)) == "done":
            logging.info("Sweep %s: run %s already done, skipped.", sweep.name, run.name)
            continue
        run_overrides = dict(run.overrides)
        if run.codebook is not None:
            spec = sweep.codebook_base
            directory = codebook_dir(workdir, run, spec)
            if not (directory / CODEBOOK_FILE).is_file():
                logging.info("Sweep %s: building codebook %s for run %s.", sweep.name, directory.name, run.name)
                codebook = apply_overrides(load_config_file(resolve(spec)), run.codebook,
                                           source=f"{spec} (codebook of run {run.name})")
                build_codebook(codebook, directory, features_dir(workdir, codebook), build_fn)
            run_overrides.update(codebook_path=str(directory / CODEBOOK_FILE), codebook_init="file")
        config = apply_overrides(base, run_overrides, source=f"{sweep.base} (run {run.name})")
        ceilings = None if run.codebook is None else ceiling.summary(ceiling.directory_cell_counts(directory),
                                                                     ceiling.split_tokens(config))
        logging.info("Sweep %s: training run %s in %s.", sweep.name, run.name, run_dir)
        result = dict(train_fn(config, run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"name": run.name, "overrides": run.overrides, "swept": run.swept, "codebook": run.codebook,
                  "codebook_swept": run.codebook_swept, "result": result, "ceiling": ceilings}
        (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=1, default=str))
        if result.get("status") != "done":
            logging.warning("Sweep %s: run %s ended %s; stopping the sweep (run it again to resume).", sweep.name,
                            run.name, result.get("status"))
            break
    return collect(runs, workdir)


def _record(path: pathlib.Path) -> dict[str, Any] | None:
    """A sweep_result.json (None when there is no such file); errors name the file."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["result"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a sweep result ({err!r})") from None
    return record


def _status(record: Mapping[str, Any] | None) -> str:
    """"missing" without a record, else its result's status ("done" when the trainer gave none)."""
    return "missing" if record is None else record["result"].get("status", "done")


def collect(runs: Sequence[SweepRun], workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """One row per run: run, swept values, codebook values (prefixed "codebook:"), status, step, the metrics
    (result keys without "eval/") and the ceilings when the run has them; runs without a result file have status
    "missing"."""
    rows = []
    for run in runs:
        record = _record(pathlib.Path(workdir) / run.name / RESULT_FILE)
        row = {"run": run.name, **run.swept, **{f"codebook:{k}": v for k, v in (run.codebook_swept or {}).items()},
               "status": _status(record)}
        if record is not None:
            result = record["result"]
            row["step"] = result.get("step")
            row.update({key.removeprefix("eval/"): result[key] for _, key, _ in METRICS if key in result})
            if splits := (record.get("ceiling") or {}).get("splits"):
                row.update(ceiling_val=splits["val"]["ceiling"], ceiling_epoch=splits["epoch"]["ceiling"])
                if "utilization" in row:
                    row["util_per_ceiling"] = row["utilization"] / row["ceiling_val"]
        rows.append(row)
    return rows


def sweep_markdown(name: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table titled `name`: run, the scalar swept values, status, metrics, with the ceiling
    columns after utilization % when a row has a ceiling."""
    ceilings = CEILING_COLUMNS if any("ceiling_val" in row for row in rows) else ()
    columns = [(header, key.removeprefix("eval/"), scale) for header, key, scale in METRICS]
    columns[1:1] = ceilings
    swept = [k for k in dict.fromkeys(k for row in rows for k in row)
             if k not in ("run", "status", "step", *(key for _, key, _ in columns))
             and all(isinstance(row.get(k), (str, int, float, bool, type(None))) for row in rows)]
    headers = ["run", *swept, "status", *(header for header, _, _ in columns)]
    body = []
    for row in rows:
        values = [row.get(key) for _, key, _ in columns]
        body.append([row["run"], *(row.get(k) for k in swept), row["status"],
                     *(None if v is None else v * scale for v, (_, _, scale) in zip(values, columns))])
    return f"## {name}\n\n" + markdown_table(headers, body)
