"""Generation metrics over streamed samples: FID, Inception Score, precision / recall and generation utilization.

    reference, real_features = reference_from_images(real_batches, fid=fid, resize="clean")
    result = evaluate_generated(sample_batches, fid=fid, reference=reference, reference_features=real_features,
                                num_codes=N, resize="clean")
    write_generation_report(result, output_dir, name="gpt_demo", extra={...})

Conventions (written into gen_eval.json): images arrive in [-1, 1] and are quantised to 8 bits first
(round((x + 1) * 127.5), as saved samples are); `resize="clean"` then resizes them to 299 as clean-fid
(`models.inception.resize_clean`, on the host), `"legacy"` bilinearly without antialiasing as pytorch-fid (inside
the network). Features are pytorch-fid's InceptionV3 pool3 (2048-d) and, for the Inception Score, its bias-free
1008-way logits; FID against `ReferenceStats` (made by `reference_from_images` with the same resize, or read from an
ADM reference batch, whose statistics come from ADM's TF Inception graph), IS over 10 contiguous splits,
precision / recall with k = 3 (`metrics`). Only feature statistics, the pool features precision / recall need and the
logits are kept, never the images. Each process passes its own rows, in as many batches as every other process (a
batch may be empty); the results cover all processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import platform
import zipfile
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax import metrics, parallel
from vqlc_jax.convert.inception_weights import has_logits
from vqlc_jax.evaluate import concat_over_processes, merge_over_processes, sum_over_processes
from vqlc_jax.models.inception import FEATURE_DIM, LOGITS_DIM, resize_clean
from vqlc_jax.quantizers.utilization import (
    code_counts, joint_ids, out_of_range, perplexity, split_counts, utilization)

RESIZES = {
    "clean": "clean-fid: PIL bicubic with antialiasing to 299x299, per channel as float images (mode F)",
    "legacy": "pytorch-fid: bilinear to 299x299 without antialiasing",
}
INCEPTION_METRICS = ("fid", "inception_score", "precision_recall")
IS_SPLITS = 10
PR_K = 3
QUANTISATION = "8 bits: round((x + 1) * 127.5) of images in [-1, 1]"
Batch = tuple[Any, Any]  # (images [B, H, W, 3] in [-1, 1], tokens [B, ...] int or None)


@dataclasses.dataclass
class GenerationResult:
    """Metrics of a generated set: `scalars` (num_samples, and of fid, inception_score, inception_score_std,
    precision, recall, utilization, perplexity those that could be computed), `unavailable` (metric -> reason),
    the generated tokens' per-code `counts` (None without tokens), the resize and the FID reference's description."""

    scalars: dict[str, float]
    unavailable: dict[str, str]
    counts: np.ndarray | None
    resize: str
    reference: str


@dataclasses.dataclass
class _Stream:
    """What one pass over a set of images keeps: feature statistics, pool features, logits, code counts, size."""

    stats: metrics.FeatureStats | None
    features: np.ndarray | None
    logits: np.ndarray | None
    counts: np.ndarray | None
    n: int


def quantise(images: Any) -> np.ndarray:
    """[B, H, W, 3] in [-1, 1] -> uint8, round((x + 1) * 127.5) clipped to [0, 255] (on the host)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.partial(jax.jit, static_argnames="model")
def _inception_apply(model: Any, variables: Any, images: jax.Array) -> Any:
    """Inception outputs of uint8 images (legacy) or clean-resized ones on the 0..255 scale."""
    return model.apply(variables, images.astype(jnp.float32) / 255.0)


def _features_fn(fid: tuple[Any, Any], resize: str, mesh: jax.sharding.Mesh, with_logits: bool):
    """(this process's padded images) -> pool features [B, 2048] (and logits [B, 1008]), batch-sharded."""
    model, variables = fid
    model = model.clone(resize_input=resize == "legacy", with_logits=with_logits)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    sharding = parallel.batch_sharding(mesh)

    def fn(images: np.ndarray):
        with jax.default_matmul_precision("highest"):
            return _inception_apply(model, variables, parallel.global_batch(images, sharding))

    return fn


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if len(x) < rows else x


def codebook_sizes(num_codes: int | Sequence[int] | None) -> tuple[int, ...]:
    """`num_codes` as sub-codebook sizes: (N,) for one codebook, (N_1, .., N_k) for k; () for None."""
    if num_codes is None:
        return ()
    return (int(num_codes),) if np.ndim(num_codes) == 0 else tuple(int(n) for n in num_codes)


def _joint_ids(batch: int, tokens: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Token maps ([B, h, w], or [B, k, h, w] for k sub-codebooks) as ids into the k codebooks laid end to end;
    raises naming the batch (and the sub-codebook) when a value is outside its codebook."""
    if len(sizes) > 1 and (tokens.ndim < 2 or tokens.shape[1] != len(sizes)):
        raise ValueError(f"batch {batch}: token maps {tokens.shape}, expected [B, {len(sizes)}, h, w]")
    bad = out_of_range(tokens, sizes)
    if bad is not None:
        j, lo, hi = bad
        which = "" if len(sizes) == 1 else f" of sub-codebook {j + 1}"
        raise ValueError(f"batch {batch}: token values{which} span [{lo}, {hi}], outside the codebook "
                         f"[0, {sizes[j]})")
    return joint_ids(tokens, sizes)


def _stream(batches: Iterable[Batch], *, fid: tuple[Any, Any] | None, resize: str, mesh: jax.sharding.Mesh | None,
            keep_features: bool, with_logits: bool, num_codes: int | Sequence[int] | None) -> _Stream:
    """One pass over (images, tokens) batches; Inception outputs only when `fid` is given, counts only with
    `num_codes`. Every batch is padded to the size of the largest first batch over processes (rounded up to the
    local devices), so all processes run the same global shapes when each passes the same number of batches."""
    if resize not in RESIZES:
        raise ValueError(f"resize={resize!r}: choose one of {', '.join(RESIZES)}")
    stats = metrics.FeatureStats.zeros(FEATURE_DIM) if fid else None
    features, logits = [], []
    sizes = codebook_sizes(num_codes)
    counts = np.zeros(sum(sizes), np.int64) if num_codes else None
    mesh = mesh or parallel.make_mesh()
    apply = _features_fn(fid, resize, mesh, with_logits) if fid else None
    n, rows = 0, None
    for i, (images, tokens) in enumerate(batches):
        if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
            raise ValueError(f"batch {i}: images {np.shape(images)}, expected [B, H, W, 3] in [-1, 1]")
        size = len(images)
        if counts is not None and tokens is not None:
            tokens = np.asarray(tokens)
            if len(tokens) != size:
                raise ValueError(f"batch {i}: {len(tokens)} token maps for {size} images")
            counts += np.asarray(code_counts(_joint_ids(i, tokens, sizes), len(counts)), np.int64)
        n += size
        if apply is None:
            continue
        if rows is None:  # the largest first batch over processes, rounded up to this process's batch slices
            local = mesh.local_mesh.shape[parallel.DATA]
            rows = max(-(-int(concat_over_processes(np.int64([size])).max()) // local) * local, local)
        if size > rows:
            raise ValueError(f"batch {i} has {size} images, more than the first batch's {rows} (padded, largest over "
                             "processes): batches after the first may only be smaller")
        x = quantise(images)
        x = resize_clean(x) if resize == "clean" else x
        out = apply(_pad_rows(x, rows))
        pool, lgt = (out if with_logits else (out, None))
        pool = parallel.local_rows(pool)[:size]
        stats.update(pool)
        if keep_features:
            features.append(pool)
        if lgt is not None:
            logits.append(parallel.local_rows(lgt)[:size])
    total = sum_over_processes({"n": np.int64(n), "counts": np.zeros(0, np.int64) if counts is None else counts})
    if int(total["n"]) == 0:
        raise ValueError("no images were given")

    def gathered(parts: list[np.ndarray], dim: int) -> np.ndarray:
        return concat_over_processes(np.concatenate(parts) if parts else np.zeros((0, dim), np.float32))

    return _Stream(merge_over_processes(stats) if fid else None,
                   gathered(features, FEATURE_DIM) if fid and keep_features else None,
                   gathered(logits, LOGITS_DIM) if fid and with_logits else None,
                   total["counts"] if counts is not None else None, int(total["n"]))


def reference_from_images(batches: Iterable[Any], *, fid: tuple[Any, Any] | metrics.Unavailable, resize: str,
                          mesh: jax.sharding.Mesh | None = None,
                          description: str = "") -> tuple[metrics.ReferenceStats, np.ndarray]:
    """FID statistics and pool features [N, 2048] (for precision / recall) of real images, batches [B, H, W, 3] in
    [-1, 1] (this process's rows); both cover all processes. Raises when the Inception weights are unavailable."""
    if isinstance(fid, metrics.Unavailable):
        raise ValueError(f"reference_from_images needs the Inception weights: {fid.reason}")
    stream = _stream(((images, None) for images in batches), fid=fid, resize=resize, mesh=mesh,
                     keep_features=True, with_logits=False, num_codes=None)
    description = description or f"{stream.n} real images"
    return stream.stats.reference(f"{description}, {resize} resize"), stream.features


def _missing_inputs(fid: tuple[Any, Any] | metrics.Unavailable, reference: metrics.ReferenceStats | None,
                    reference_features: np.ndarray | None) -> dict[str, str]:
    """The Inception metrics that the given inputs cannot give, with the reason."""
    if isinstance(fid, metrics.Unavailable):
        return dict.fromkeys(INCEPTION_METRICS, fid.reason)
    missing = {}
    if reference is None:
        missing["fid"] = "no reference statistics given"
    elif np.shape(reference.mu) != (FEATURE_DIM,):
        raise ValueError(f"reference statistics {reference.description!r}: mu {np.shape(reference.mu)}, expected "
                         f"the Inception pool features' [{FEATURE_DIM}]")
    if not has_logits(fid[1]):
        missing["inception_score"] = ("the Inception variables have no 1008-way fc classifier (an .npz converted "
                                      "before it was kept): reconvert pytorch-fid's .pth")
    if reference_features is None:
        missing["precision_recall"] = "no reference features of real images given"
    elif np.ndim(reference_features) != 2 or np.shape(reference_features)[1] != FEATURE_DIM:
        raise ValueError(f"reference_features {np.shape(reference_features)}, expected [N, {FEATURE_DIM}]")
    return missing


def evaluate_generated(batches: Iterable[Batch], *, fid: tuple[Any, Any] | metrics.Unavailable,
                       reference: metrics.ReferenceStats | None, reference_features: np.ndarray | None,
                       num_codes: int | Sequence[int] | None, resize: str = "clean",
                       mesh: jax.sharding.Mesh | None = None) -> GenerationResult:
    """Metrics of generated (images [B, H, W, 3] in [-1, 1], tokens [B, ...] or None) batches, this process's rows.

    FID needs the Inception weights and `reference` (pool-feature statistics, 2048-d); the Inception Score the
    weights with their `fc` classifier; precision / recall the weights and `reference_features` [N, 2048] of real
    images (same resize); utilization and perplexity `num_codes` and tokens (`num_codes` a tuple of k sizes:
    tokens [B, k, h, w] and also `utilization_j` / `perplexity_j` per sub-codebook, `utilization` over all k
    codebooks). What cannot be computed is reported in `unavailable` with the reason.
    """
    unavailable = _missing_inputs(fid, reference, reference_features)
    with_logits = "inception_score" not in unavailable
    stream = _stream(batches, fid=None if all(m in unavailable for m in INCEPTION_METRICS) else fid, resize=resize,
                     mesh=mesh, keep_features="precision_recall" not in unavailable, with_logits=with_logits,
                     num_codes=num_codes)
    n = stream.n
    needs = {"fid": (2, n, "samples"), "inception_score": (IS_SPLITS, n, "samples (one per split)"),
             "precision_recall": (PR_K + 1, min(n, len(reference_features if reference_features is not None else [])),
                                  "samples and reference images (k + 1)")}
    for metric, (least, have, what) in needs.items():
        if metric not in unavailable and have < least:
            unavailable[metric] = f"needs at least {least} {what}, got {have}"
    scalars = {"num_samples": float(n)}
    if "fid" not in unavailable:
        scalars["fid"] = metrics.frechet_distance(stream.stats.mu, stream.stats.sigma, reference.mu, reference.sigma)
    if "inception_score" not in unavailable:
        scalars["inception_score"], scalars["inception_score_std"] = metrics.inception_score(stream.logits, IS_SPLITS)
    if "precision_recall" not in unavailable:
        scalars["precision"], scalars["recall"] = metrics.precision_recall(reference_features, stream.features, PR_K)
    counts = stream.counts
    if num_codes is None:
        unavailable["utilization"] = "no codebook size (num_codes) given"
    elif counts.sum() == 0:
        unavailable["utilization"], counts = "the samples came without token maps", None
    else:
        scalars["utilization"] = float(utilization(counts))
        sizes = codebook_sizes(num_codes)
        if len(sizes) == 1:
            scalars["perplexity"] = float(perplexity(counts))
        for j, part in enumerate(split_counts(counts, sizes) if len(sizes) > 1 else ()):
            scalars[f"utilization_{j + 1}"] = float(utilization(part))
            scalars[f"perplexity_{j + 1}"] = float(perplexity(part))
    return GenerationResult(scalars, unavailable, counts, resize, reference.description if reference else "")


def _npy_shape(archive: zipfile.ZipFile, name: str) -> tuple[int, ...]:
    """The shape of `name` in an `.npz` from its header alone (the data is not read)."""
    with archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        return read(f)[0]


def load_adm_reference(path: str | pathlib.Path) -> metrics.ReferenceStats:
    """FID statistics of an ADM reference batch `.npz` (`mu` [2048], `sigma` [2048, 2048]; the image count from
    `arr_0` when present, 0 otherwise). ADM computed them with TF's Inception graph, not pytorch-fid's network."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ADM reference batch not found: {path}")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise KeyError(f"{path}: an ADM reference batch needs {' and '.join(missing)} (has "
                           f"{', '.join(data.files)})")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        has_images = "arr_0" in data.files
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape}, expected [{FEATURE_DIM}] and "
                         f"[{FEATURE_DIM}, {FEATURE_DIM}]")
    n = 0
    if has_images:
        with zipfile.ZipFile(path) as archive:
            n = int(_npy_shape(archive, "arr_0")[0])
    count = f"{n} images" if n else "statistics only"
    return metrics.ReferenceStats(mu, sigma, n, f"ADM reference batch {path.name} ({count}; TF Inception graph)")


def _fmt(scalars: dict[str, float], key: str, spec: str, scale: float = 1.0) -> str:
    return format(scale * scalars[key], spec) if key in scalars else "n/a"


def markdown_table(result: GenerationResult, name: str) -> str:
    """One Markdown table row (unavailable metrics n/a, with their reasons below) and the FID protocol."""
    s = result.scalars
    inception = f"{s['inception_score']:.2f} ± {s['inception_score_std']:.2f}" if "inception_score" in s else "n/a"
    cols = [("samples", f"{int(s['num_samples'])}"), ("FID", _fmt(s, "fid", ".2f")), ("IS", inception),
            ("precision", _fmt(s, "precision", ".3f")), ("recall", _fmt(s, "recall", ".3f")),
            ("gen. utilization %", _fmt(s, "utilization", ".2f", 100.0)),
            ("perplexity", _fmt(s, "perplexity", ".1f")), ("resize", result.resize)]
    lines = ["| generator | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {name} | " + " | ".join(v for _, v in cols) + " |", "", f"FID protocol: {fid_protocol(result)}."]
    lines += [f"{metric} unavailable: {reason}" for metric, reason in result.unavailable.items()]
    return "\n".join(lines) + "\n"


def fid_protocol(result: GenerationResult) -> str:
    return f"Inception (pytorch-fid weights) FID vs {result.reference or 'no reference'}"


def write_generation_report(result: GenerationResult, output_dir: str | pathlib.Path, *, name: str,
                            extra: dict | None = None) -> dict:
    """gen_eval.json (metrics, sample count, resize, FID protocol, conventions, versions, unavailable metrics with
    reasons, `extra`), gen_eval.md and, with tokens, gen_code_counts.npy under `output_dir`; returns the report."""
    import PIL

    output = pathlib.Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = {"generator": name, "metrics": result.scalars, "num_samples": int(result.scalars["num_samples"]),
              "resize": result.resize, "fid_protocol": fid_protocol(result), "unavailable": result.unavailable,
              "conventions": {"quantisation": QUANTISATION, "resize": RESIZES[result.resize],
                              "inception_score": f"{IS_SPLITS} contiguous splits, bias-free 1008-way logits",
                              "precision_recall": f"k-NN manifolds (Kynkaanniemi et al.), k = {PR_K}, as ADM",
                              "utilization": "share of the codes used at least once by the generated token maps"},
              "versions": {"jax": jax.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
                           "python": platform.python_version(), "backend": jax.default_backend(),
                           "devices": jax.device_count()},
              **(extra or {})}
    (output / "gen_eval.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    (output / "gen_eval.md").write_text(markdown_table(result, name))
    if result.counts is not None:
        np.save(output / "gen_code_counts.npy", result.counts)
    return report


# ----------------------------------------------------------------------------------------------------------------------
# The generation job: python -m vqlc_jax.generators.evaluate --generator DIR --config configs/eval/X.py --output OUT
# ----------------------------------------------------------------------------------------------------------------------
def load_reference(config: Any, fid: tuple[Any, Any] | metrics.Unavailable, mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[metrics.ReferenceStats | None, np.ndarray | None]:
    """The FID reference of `config`: `reference_path` (an ADM `.npz` with mu/sigma, or statistics saved by
    `metrics.save_reference_stats`), else the statistics and features of the real split `reference_data` (with the
    same resize), else (None, None)."""
    if config.reference_path:
        path = pathlib.Path(config.reference_path)
        if not path.is_file():
            raise FileNotFoundError(f"config.reference_path={str(path)!r}: no such file")
        with np.load(path) as data:
            ours = {"n", "description"} <= set(data.files)  # written by metrics.save_reference_stats
        return (metrics.load_reference_stats(path) if ours else load_adm_reference(path)), None
    d = config.reference_data
    if not d.name or isinstance(fid, metrics.Unavailable):
        return None, None
    from vqlc_jax import data as data_lib

    source = data_lib.make_source(d.name, d.split, dict(d.options))
    source = data_lib.Subset(source, d.max_images) if d.max_images else source
    batches = data_lib.make_pipeline(source, resolution=d.resolution, global_batch_size=config.batch_size, seed=0,
                                     train=False, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    real = (batch.image[batch.mask] for batch in batches)
    return reference_from_images(real, fid=fid, resize=config.resize, mesh=mesh,
                                 description=f"{d.name} {d.split} ({len(source)} images)")


def sample_batches(generator: Any, labels: np.ndarray, *, batch_size: int, seed: int, tokenizer: Any = None,
                   sample_options: dict | None = None) -> Iterable[Batch]:
    """(decoded images, token maps or None) of this process's share of `labels`, `batch_size` at a time; every
    process yields the same number of batches, and the draws depend on (seed, batch index) only."""
    tokenizer = tokenizer or generator.tokenizer()
    shares = np.array_split(labels, jax.process_count())
    mine, batches = shares[jax.process_index()], -(-len(shares[0]) // batch_size)
    offset = sum(len(s) for s in shares[:jax.process_index()])
    for b in range(batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        if not len(chunk):
            yield np.zeros((0, 1, 1, 3), np.float32), None
            continue
        rng = jax.random.fold_in(jax.random.key(seed), offset + b * batch_size)
        samples = generator.sample(rng, chunk, **(sample_options or {}))
        yield generator.family.decode(tokenizer, samples), generator.family.samples_to_tokens(tokenizer, samples)


def evaluate_generator(generator: Any, config: Any, output: str | pathlib.Path, *, name: str = "") -> dict:
    """Samples `config.samples_per_class` per class (class-balanced), decodes them, and writes the generation
    report (FID, IS, precision / recall where the Inception weights and a reference are given; utilization and
    perplexity always) plus a grid of the first samples under `output`; returns the report."""
    from absl import logging

    from vqlc_jax.generators.sampling import class_balanced_labels

    output = pathlib.Path(output)
    num_classes = generator.family.num_classes
    labels = class_balanced_labels(config.samples_per_class * num_classes, num_classes, seed=config.seed)
    fid = metrics.load_fid_model(config.inception_path or None)
    if isinstance(fid, metrics.Unavailable):
        logging.warning("FID, IS and precision/recall unavailable: %s", fid.reason)
    reference, features = load_reference(config, fid)
    options = {k: v for k, v in config.sample.items() if v is not None}
    result = evaluate_generated(
        sample_batches(generator, labels, batch_size=config.batch_size, seed=config.seed, sample_options=options),
        fid=fid, reference=reference, reference_features=features,
        num_codes=getattr(generator.family, "codebook_sizes", generator.info.num_codes),
        resize=config.resize)
    extra = {"sampling": {**generator.config.sample.to_dict(), **options}, "seed": config.seed,
             "samples_per_class": config.samples_per_class, "num_classes": num_classes}
    report = write_generation_report(result, output, name=name or generator.config.generator, extra=extra)
    if jax.process_index() == 0:
        grid_labels = labels[np.argsort(labels, kind="stable")][:64]
        images = generator.generate(jax.random.key(config.seed), grid_labels, **options)
        save_sample_grid(images, grid_labels, 8, output / "samples.png")
    return report


def save_sample_grid(images: np.ndarray, labels: np.ndarray, per_row: int, path: pathlib.Path) -> np.ndarray:
    """Writes samples in [-1, 1] as a PNG, `per_row` per row, enlarged to at least 64 px, each row under a caption
    of its class; returns the grid (uint8 HWC)."""
    from PIL import Image

    from vqlc_jax.evaluate import enlarge, with_caption

    images = enlarge(((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).round().astype(np.uint8))
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    width = per_row * images.shape[2]
    grid = np.concatenate([
        with_caption(np.pad(np.concatenate(list(row), axis=1), ((0, 0), (0, width - len(row) * images.shape[2]),
                                                                (0, 0)), constant_values=255),
                     f"class {int(labels[r * per_row])}")
        for r, row in enumerate(rows)])
    Image.fromarray(grid).save(path)
    return grid


def cli() -> None:
    from absl import app, flags, logging
    from ml_collections import config_flags

    from vqlc_jax.generators.generator import Generator

    config = config_flags.DEFINE_config_file("config", None, "Generation evaluation config (configs/eval/gen_*.py).",
                                             lock_config=True)
    generator = flags.DEFINE_string("generator", None, "A directory written by Generator.save (WORKDIR/generator).")
    workdir = flags.DEFINE_string("workdir", None, "A generator training workdir (its generator/ is evaluated).")
    output = flags.DEFINE_string("output", None, "Report directory (default: beside the generator, gen_eval/).")
    flags.mark_flag_as_required("config")
    start_distributed = parallel.define_distributed_flags()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not (generator.value or workdir.value):
            raise app.UsageError("pass --generator DIR (a Generator.save directory) or --workdir DIR (a training "
                                 "workdir)")
        start_distributed()
        directory = pathlib.Path(generator.value or pathlib.Path(workdir.value) / "generator")
        out = pathlib.Path(output.value or directory.parent / "gen_eval")
        report = evaluate_generator(Generator.load(directory), config.value, out)
        logging.info("%s", json.dumps(report["metrics"]))
        print((out / "gen_eval.md").read_text())

    app.run(main)


if __name__ == "__main__":
    cli()
