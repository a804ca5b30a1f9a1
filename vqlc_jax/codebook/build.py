"""Build a VQGAN-LC codebook: extract pooled patch features of a dataset, then cluster them.

    python -m vqlc_jax.codebook.build --config configs/codebook/<name>.py --workdir DIR [--stage=all|extract|cluster]

Stage `extract` writes the feature shards in `DIR/features` (`vqlc_jax.codebook.extract`); stage `cluster` reads
them (memory-mapped, streamed via `NpyShards` beyond `codebook.max_resident_gb`) and writes `DIR/codebook.npy`
[N, D] float32 and `DIR/codebook.json` (extractor, checkpoint, dataset, pooling, mode, k, steps, inertia, date, the
features' summary) via `save_codebook`. Both stages resume: finished shards are kept, k-means restarts from its
checkpoint in `DIR/kmeans/<features id>` (a digest of the shards, so new features start a new clustering; other
k-means options than the checkpoint's are refused, naming them). `codebook.method` chooses the initialisation
ablation: `kmeans` (the paper's), or `random` (Gaussian with the features' mean/std) and `random_selection` (N
feature rows).
Multi-host: JAX detects TPU pods and SLURM; otherwise pass --coordinator_address, --num_processes, --process_id.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import time

import jax
import ml_collections
import numpy as np

from vqlc_jax.codebook import extract
from vqlc_jax.codebook.kmeans import (
    CODEBOOK_METHODS,
    MODES,
    build_codebook,
    codebook_from_features,
    inertia,
    save_codebook,
)
from vqlc_jax.codebook.kmeans_data import NpyShards

STAGES = ("all", "extract", "cluster")
KMEANS_DIR = "kmeans"
# What the command line logs of the result.
SUMMARY_KEYS = ("total_images", "total_rows", "skipped", "mode", "num_codes", "final_batch_inertia", "mean_inertia",
                "seconds")


def base_config() -> ml_collections.ConfigDict:
    """Every key of a codebook config with its default: the release's recipe (CLIP ViT-L/14, 224 px, pool 4,
    per-class k=100 on ImageNet train); config files override what differs."""
    c = ml_collections.ConfigDict()
    # The split to extract: `vqlc_jax.data.make_source(name, split, options)`, at most max_images (0: all).
    c.data = dict(name="imagenet2012", split="train", options={}, resolution=224, max_images=0)
    # clip: a local Hugging Face CLIP folder (layer, post_layernorm, projection as CLIPFeatureExtractor);
    # pixels: patch_size x patch_size pixel patches, divided by sqrt(patch_size^2 * 3) unless rms_scale is False
    # (see codebook/pixels.py). Both pool x pool average-pooled; dtype: compute dtype.
    c.extractor = dict(name="clip", checkpoint="", layer=-1, post_layernorm=True, projection=True, patch_size=4,
                       rms_scale=True, pool=4, dtype="float32")
    # num_devices: 0 = all (only a single-process run may use fewer); num_workers: decoding threads (0: default).
    c.extract = dict(global_batch_size=256, images_per_shard=10_240, feature_dtype="float16", num_devices=0,
                     num_workers=0)
    # method: kmeans | random | random_selection; mode: global | per_class (kmeans only); k: centres in total
    # (global) or per class. final_inertia: exact inertia over every row (N x rows distances: small runs only).
    c.codebook = dict(method="kmeans", mode="per_class", k=100, final_inertia=False, max_resident_gb=2.0)
    # `KMeansConfig` fields (batch_size is per class in per_class mode) and build_codebook's classes_per_run
    # (0: all classes in one vmapped run).
    c.kmeans = dict(batch_size=1024, num_steps=500, seed=0, init="kmeans++", dot_dtype="float32",
                    reassignment_ratio=0.01, steps_per_call=32, checkpoint_every=1000, log_every=100,
                    classes_per_run=0)
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose value cannot work (k-means options: at clustering)."""
    extract.check_config(config)
    cb = config.codebook
    for key, value, choices in (("method", cb.method, CODEBOOK_METHODS), ("mode", cb.mode, MODES)):
        if value not in choices:
            raise ValueError(f"config.codebook.{key}={value!r}: choices: {', '.join(choices)}")
    if cb.k < 1:
        raise ValueError(f"config.codebook.k={cb.k!r}: must be positive")
    if cb.mode == "per_class" and cb.method != "kmeans":
        raise ValueError(f"config.codebook.mode='per_class': only codebook.method='kmeans' clusters per class, "
                         f"got method={cb.method!r}")
    if config.kmeans.classes_per_run < 0:
        raise ValueError(f"config.kmeans.classes_per_run={config.kmeans.classes_per_run}: must be >= 0 (0: all)")


def _features(features: NpyShards, max_resident_gb: float) -> NpyShards | np.ndarray:
    """The shards as one float32 array in memory (copied to the devices by k-means) when small enough."""
    if features.num_rows * features.dim * 4 > max_resident_gb * 2**30:
        return features
    return np.asarray(features.read(np.arange(features.num_rows)), np.float32)


def features_id(manifest: dict) -> str:
    """A digest of the shards' contents: names the k-means checkpoint folder, so new features never resume an old
    clustering."""
    digest = hashlib.sha256()
    for shard in manifest["shards"]:
        digest.update((shard["features"]["sha256"] + shard["labels"]["sha256"]).encode())
    return digest.hexdigest()[:16]


def cluster(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Clusters `workdir/features` into `workdir/codebook.npy` + `.json`; returns the codebook's metadata."""
    validate(config)
    workdir = pathlib.Path(workdir)
    shards, labels, manifest = extract.open_features(workdir / extract.FEATURES_DIR)
    cb, km, run_id = config.codebook, config.kmeans.to_dict(), features_id(manifest)
    features = _features(shards, cb.max_resident_gb)
    start = time.perf_counter()
    if cb.method == "kmeans":
        classes_per_run = km.pop("classes_per_run") or None
        k = {"k_total": cb.k} if cb.mode == "global" else {"k_per_class": cb.k, "classes_per_run": classes_per_run}
        centres, metadata = build_codebook(features, labels if cb.mode == "per_class" else None, mode=cb.mode,
                                           checkpoint_dir=str(workdir / KMEANS_DIR / run_id), **k, **km)
    else:
        centres = codebook_from_features(features, cb.k, cb.method, seed=km["seed"])
        metadata = {"mode": "global", "k": cb.k, "seed": km["seed"]}
    metadata.update(method=cb.method, seconds=round(time.perf_counter() - start, 3))
    if cb.final_inertia:
        total = inertia(features, centres)
        metadata.update(inertia=total, mean_inertia=total / shards.num_rows)
    summary = {key: manifest[key] for key in ("dim", "dtype", "vectors_per_image", "total_rows", "total_images",
                                              "skipped", "num_shards", "date")}
    metadata.update(extractor=manifest["extractor"], checkpoint=manifest["extractor"].get("checkpoint"),
                    dataset=manifest["dataset"], pooling=manifest["extractor"]["pool"],
                    features={"directory": str((workdir / extract.FEATURES_DIR).absolute()), "id": run_id, **summary})
    if jax.process_index() == 0:
        save_codebook(workdir, centres, metadata)
    return metadata


def build(config: ml_collections.ConfigDict, workdir: str | os.PathLike, stage: str = "all") -> dict:
    """Runs `stage` ("all", "extract" or "cluster") of `config` in `workdir`; returns the features' manifest
    (stage extract) or the codebook's metadata."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choices: {', '.join(STAGES)}")
    validate(config)
    if stage != "cluster":
        manifest = extract.extract_features(config, workdir)
        if stage == "extract":
            return manifest
    return cluster(config, workdir)


def cli() -> None:
    """The command line of this module."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    from vqlc_jax import parallel

    config = config_flags.DEFINE_config_file("config", None, "Codebook config file (configs/codebook/*.py[:variant]).",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Directory for the features, k-means checkpoints and codebook.")
    stage = flags.DEFINE_enum("stage", "all", STAGES, "Which part of the job to run.")
    start_distributed = parallel.define_distributed_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        start_distributed()
        result = build(config.value, workdir.value, stage.value)
        logging.info("Finished: %s", {k: result[k] for k in SUMMARY_KEYS if k in result})

    app.run(main)


if __name__ == "__main__":
    cli()
