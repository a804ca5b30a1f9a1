"""Generators over tokenizer outputs: sampling, official checkpoints, the families the generator trainer trains.

`load_official(kind, source, **options)` reads a released checkpoint: `(model, variables)` of a generator or the ViT,
a `Tokenizer` for "fqgan"; each kind's loader is imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

# kind -> "module:function" of its loader; None: a kind that has no loader yet.
OFFICIAL_LOADERS: dict[str, str | None] = {
    "gpt": "vqlc_jax.convert.official_gpt:load_official_gpt",
    "dit": "vqlc_jax.convert.official_dit:load_official_dit",
    "sit": "vqlc_jax.convert.official_dit:load_official_sit",
    "ldm": "vqlc_jax.convert.official_ldm:load_official_ldm",
    "fqgan": "vqlc_jax.tokenizer:from_official_fqgan",
    "far": "vqlc_jax.convert.official_far:load_official_far",
    "vit": "vqlc_jax.convert.mae_weights:load_official_vit",
}


def load_official(kind: str, source: Any, **options) -> tuple[Any, dict]:
    """(model, variables) of a released `kind` checkpoint (a path or a dict of arrays keyed by the release's names);
    `options` go to that kind's loader (GPT: `num_heads`, `num_classes=1000`, `dtype`)."""
    if kind not in OFFICIAL_LOADERS:
        raise ValueError(f"load_official: unknown kind {kind!r}; kinds: {', '.join(OFFICIAL_LOADERS)}")
    target = OFFICIAL_LOADERS[kind]
    if target is None:
        raise NotImplementedError(f"load_official: no loader for {kind!r} checkpoints yet")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(source, **options)
