"""The quantizer registry: `make_quantizer(name, **options)`. `fq` (`vqlc_jax.quantizers.fq`), which composes the
others, adds itself when the package is imported."""

from __future__ import annotations

import dataclasses
from typing import Any

from vqlc_jax.quantizers.base import Quantizer
from vqlc_jax.quantizers.ema import EMAQuantizer
from vqlc_jax.quantizers.fc import FCQuantizer
from vqlc_jax.quantizers.l2vq import L2VQQuantizer
from vqlc_jax.quantizers.lc import LCQuantizer
from vqlc_jax.quantizers.vq import VQQuantizer

# `fq` (FQQuantizer) is not a Quantizer: it splits its input over k sub-quantizers and returns [B, k, ...] tokens.
QUANTIZERS: dict[str, type] = {
    "lc": LCQuantizer,
    "vq": VQQuantizer,
    "fc": FCQuantizer,
    "ema": EMAQuantizer,
    "l2vq": L2VQQuantizer,
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
