"""Quantizers (VQGAN-LC and its baselines) behind one interface, chosen by name from `QUANTIZERS`."""

from __future__ import annotations

from vqlc_jax.quantizers.base import Quantizer, straight_through
from vqlc_jax.quantizers.ema import EMAQuantizer, ema_update
from vqlc_jax.quantizers.fc import FCQuantizer
from vqlc_jax.quantizers.fq import FQQuantizer
from vqlc_jax.quantizers.l2vq import L2VQQuantizer
from vqlc_jax.quantizers.lc import LCQuantizer, load_codebook
from vqlc_jax.quantizers.registry import QUANTIZERS, make_quantizer
from vqlc_jax.quantizers.search import DEFAULT_CHUNK_SIZE, nearest_codes
from vqlc_jax.quantizers.utilization import code_counts, perplexity, utilization
from vqlc_jax.quantizers.vq import VQQuantizer

__all__ = [
    "DEFAULT_CHUNK_SIZE", "EMAQuantizer", "FCQuantizer", "FQQuantizer", "L2VQQuantizer", "LCQuantizer", "QUANTIZERS",
    "Quantizer", "VQQuantizer",
    "code_counts", "ema_update", "load_codebook", "make_quantizer", "nearest_codes", "perplexity",
    "straight_through", "utilization",
]
