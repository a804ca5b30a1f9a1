"""Input pipelines: sources chosen by name (`make_source`), deterministic resumable batches (`make_pipeline`).

    source = make_source("bundled", "train", {"resolution": 64})
    pipeline = make_pipeline(source, resolution=64, global_batch_size=32, seed=0, train=True, start_step=step,
                             process_index=jax.process_index(), process_count=jax.process_count())
    for batch in pipeline:  # or batches = iter(pipeline); next(batches)
        ...  # batch.image, batch.arrays(), batch.step, batch.end_of_epoch; pipeline.skipped.count
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from vqlc_jax.data.bundled import BundledSource
from vqlc_jax.data.folder import FolderSource
from vqlc_jax.data.imagenet import ImageNetSource
from vqlc_jax.data.pipeline import Batch, Pipeline, SkippedImages, make_pipeline
from vqlc_jax.data.sources import Record, Source, Subset

SOURCES: dict[str, Callable[..., Source]] = {
    "bundled": BundledSource,
    "folder": FolderSource,
    "imagenet2012": ImageNetSource,
}


def make_source(name: str, split: str, options: Mapping[str, Any] | None = None) -> Source:
    """The `split` of source `name` (a key of `SOURCES`), built with the keyword arguments in `options`
    (bundled: resolution, scales, stride, val_fraction; folder: root; imagenet2012: data_dir)."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; expected one of {sorted(SOURCES)}")
    factory, options = SOURCES[name], dict(options or {})
    accepted = set(inspect.signature(factory).parameters) - {"split"}
    if unknown := sorted(set(options) - accepted):
        raise ValueError(f"unknown option(s) {unknown} for data source {name!r}; expected {sorted(accepted)}")
    return factory(split, **options)


__all__ = ["SOURCES", "Batch", "BundledSource", "FolderSource", "ImageNetSource", "Pipeline", "Record",
           "SkippedImages", "Source", "Subset", "make_pipeline", "make_source"]
