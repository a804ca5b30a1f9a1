"""Read the FQGAN release's FAR generator (`autoregressive/models/far_{dual,triple}.py`) into
`vqlc_jax.models.far.FAR`.

Accepted: its state dict (`cls_embedding.embedding_table.weight`, `tok_embeddings_j.weight`, `aggregation_layer.*`,
`layers.i.*`, `ar_head.i.*`, `norm.weight`, `output_j.weight`) as a `.pth` (`{'model': state_dict, ...}` as the
release saves, a `module.` prefix stripped), an `.npz` (keys under `state_dict/`) or a dict of arrays. The number of
sub-codebooks and their sizes, width, layers, head layers, SwiGLU width and classes are read off the weights; the
head count and the number of image positions (RoPE has no weights) are given.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict
from vqlc_jax.models.far import FAR


def _key_to_path(key: str):
    """Release key -> Flax path: embedding tables keep their [num, dim] layout."""
    if key == "cls_embedding.embedding_table.weight":
        return ("params", "cls_embedding", "embedding")
    if re.fullmatch(r"tok_embeddings_\d+\.weight", key):
        return ("params", key.split(".")[0], "embedding")
    return default_path(key)


def _num_blocks(state: Mapping[str, Any], name: str) -> int:
    """Blocks in the `name.i.*` keys (1 + the largest i; 0 without any)."""
    return 1 + max((int(m.group(1)) for k in state if (m := re.match(rf"{name}\.(\d+)\.", k))), default=-1)


def far_from_state_dict(state_dict: Mapping[str, np.ndarray], *, num_heads: int, num_tokens: int = 256,
                        num_classes: int | None = None, dtype: Any = jnp.float32,
                        source: str = "state dict") -> tuple[FAR, dict]:
    """(FAR, {'params': ...}) of a release state dict; every unknown, missing or mis-shaped key is listed in one
    CheckpointMismatchError. `num_classes` (default: the class table's rows - 1) must leave one null row."""
    state = dict(state_dict)
    tables = sorted((int(m.group(1)), k) for k in state if (m := re.fullmatch(r"tok_embeddings_(\d+)\.weight", k)))
    needed = [k for k in ("cls_embedding.embedding_table.weight", "layers.0.feed_forward.w1.weight") if k not in state]
    if not tables or needed:
        raise CheckpointMismatchError(f"{source}: missing {', '.join(needed) or 'tok_embeddings_1.weight'} (needed "
                                      f"to read the model's sizes); keys present: {', '.join(sorted(state)[:20])}")
    if [j for j, _ in tables] != list(range(1, len(tables) + 1)):
        raise CheckpointMismatchError(f"{source}: sub-codebook tables {[k for _, k in tables]} are not "
                                      "tok_embeddings_1 .. tok_embeddings_k")
    sizes = tuple(int(np.shape(state[k])[0]) for _, k in tables)
    width = int(np.shape(state[tables[0][1]])[1])
    rows = int(np.shape(state["cls_embedding.embedding_table.weight"])[0])
    num_classes = rows - 1 if num_classes is None else num_classes
    if rows != num_classes + 1:
        raise ValueError(f"{source}: the class table has {rows} rows, num_classes={num_classes} needs "
                         f"{num_classes + 1} (the classes and the null class of label dropout)")
    if width % num_heads:
        raise ValueError(f"{source}: width {width} is not divisible by num_heads={num_heads}")
    # The SwiGLU width as stored: rounding int(8 W / 3) up to a multiple of itself gives itself.
    hidden = int(np.shape(state["layers.0.feed_forward.w1.weight"])[0])
    model = FAR(codebook_sizes=sizes, num_classes=num_classes, block_size=num_tokens + 1,
                num_layers=_num_blocks(state, "layers"), num_heads=num_heads, width=width,
                head_layers=_num_blocks(state, "ar_head"), dtype=dtype, multiple_of=hidden)
    if model.mlp_hidden != hidden:
        raise ValueError(f"{source}: SwiGLU width {hidden} is below LlamaGen's int(8 * {width} / 3)")
    template = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1,), jnp.int32),
                              jax.ShapeDtypeStruct((1, len(sizes), num_tokens), jnp.int32))
    return model, map_state_dict(state, template, key_to_path=_key_to_path, source=source)


def load_official_far(source: str | pathlib.Path | Mapping[str, Any], *, num_heads: int, num_tokens: int = 256,
                      num_classes: int | None = None, dtype: Any = jnp.float32) -> tuple[FAR, dict]:
    """(FAR, variables) from a release FAR checkpoint (`.pth`, `.npz` or a dict of arrays keyed by its names).

    `model.apply(variables, labels, tokens)` with labels [B] (the null class is `num_classes`) and the sub-token
    maps `tokens` [B, k, T] (or the release's list `[idx_1, .., idx_k]` of [B, T]; 1 = visual, 2 = semantic, as
    its training script) gives the release's training logits `(logits_1, .., logits_k)`, each [B, T, V_j].
    """
    name = "state dict" if isinstance(source, Mapping) else str(source)
    return far_from_state_dict(read_state_dict(source), num_heads=num_heads, num_tokens=num_tokens,
                               num_classes=num_classes, dtype=dtype, source=name)
