"""Quantizers (VQGAN-LC and its baselines) behind one interface, chosen by name from `QUANTIZERS`."""

from __future__ import annotations

import dataclasses
from typing import Any

from vqlc_jax.quantizers.base import Quantizer, straight_through
from vqlc_jax.quantizers.ema import EMAQuantizer, ema_update
from vqlc_jax.quantizers.fc import FCQuantizer
from vqlc_jax.quantizers.fq import FQQuantizer, L2VQQuantizer
from vqlc_jax.quantizers.lc import LCQuantizer, load_codebook
from vqlc_jax.quantizers.search import DEFAULT_CHUNK_SIZE, nearest_codes
from vqlc_jax.quantizers.utilization import code_counts, perplexity, utilization
from vqlc_jax.quantizers.vq import VQQuantizer

# `fq` (FQQuantizer) is not a Quantizer: it splits its input over k sub-quantizers and returns [B, k, ...] tokens.
QUANTIZERS: dict[str, type] = {
    "lc": LCQuantizer,
    "vq": VQQuantizer,
    "fc": FCQuantizer,
    "ema": EMAQuantizer,
    "l2vq": L2VQQuantizer,
    "fq": FQQuantizer,
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
    "DEFAULT_CHUNK_SIZE", "EMAQuantizer", "FCQuantizer", "FQQuantizer", "L2VQQuantizer", "LCQuantizer", "QUANTIZERS", "Quantizer", "VQQuantizer",
    "code_counts", "ema_update", "load_codebook", "make_quantizer", "nearest_codes", "perplexity",
    "straight_through", "utilization",
]
