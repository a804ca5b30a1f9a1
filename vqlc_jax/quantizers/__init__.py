"""Quantizers (VQGAN-LC and its baselines) behind one interface, chosen by name from `QUANTIZERS`."""

from __future__ import annotations

import dataclasses
from typing import Any

from vqlc_jax.quantizers.base import Quantizer, straight_through
from vqlc_jax.quantizers.ema import EMAQuantizer, ema_update
from vqlc_jax.quantizers.fc import FCQuantizer
from vqlc_jax.quantizers.lc import LCQuantizer, load_codebook
from vqlc_jax.quantizers.search import DEFAULT_CHUNK_SIZE, nearest_codes
from vqlc_jax.quantizers.utilization import code_counts, perplexity, utilization
from vqlc_jax.quantizers.vq import VQQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "lc": LCQuantizer,
    "vq": VQQuantizer,
    "fc": FCQuantizer,
    "ema": EMAQuantizer,
}


def make_quantizer(name: str, **kwargs: Any) -> Quantizer:
    """The quantizer registered as `name`, built from its fields (num_codes, embed_dim, ...)."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choices: {', '.join(QUANTIZERS)}")
    cls = QUANTIZERS[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "parent"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"quantizer {name!r}: unknown options {unknown}; options: {', '.join(sorted(fields))}")
    return cls(**kwargs)


__all__ = [
    "DEFAULT_CHUNK_SIZE", "EMAQuantizer", "FCQuantizer", "LCQuantizer", "QUANTIZERS", "Quantizer", "VQQuantizer",
    "code_counts", "ema_update", "load_codebook", "make_quantizer", "nearest_codes", "perplexity",
    "straight_through", "utilization",
]
