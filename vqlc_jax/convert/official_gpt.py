"""Read the VQGAN-LC release's GPT (`vqgan-gpt-lc/models/mingpt.py`) into `vqlc_jax.models.gpt.GPT`.

Accepted: the flat GPT state dict (`tok_emb.weight`, `pos_emb`, `blocks.i.*`, `ln_f.*`, `head.weight`), or a stage-2
`VQGANTransformer` checkpoint where those keys sit under `transformer.` (beside `vqgan.*`, which are ignored),
optionally under `module.`; as a `.pth`, an `.npz` (keys under `state_dict/`) or a dict of arrays. Layers, width,
block size and vocabulary are read off the weights; the head count cannot be and is given.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict, strip_prefix
from vqlc_jax.models.gpt import GPT

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def gpt_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The GPT's own keys: `module.` and `transformer.` prefixes removed, `vqgan.*` dropped; other keys are kept
    (and reported as unknown by the mapping)."""
    state = dict(state_dict)
    if state and all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module")
    if any(k.startswith("transformer.") for k in state):
        rest = {k: v for k, v in state.items() if not k.startswith(("transformer.", "vqgan."))}
        state = {**strip_prefix(state, "transformer"), **rest}
    return state


def _key_to_path(key: str):
    """Release key -> Flax path: embeddings keep their [num, dim] layout; `attn.mask` buffers have no parameter."""
    if key.endswith(".attn.mask"):
        return None
    if key == "tok_emb.weight":
        return ("params", "tok_emb", "embedding")
    return default_path(key)


def _bad_masks(state: Mapping[str, np.ndarray], block_size: int) -> list[str]:
    """`attn.mask` buffers that are not the [1, 1, block, block] lower-triangular ones of minGPT."""
    want = np.tril(np.ones((block_size, block_size)))[None, None]
    return [f"{k}: {np.shape(v)}" + ("" if np.shape(v) != want.shape else ", not lower-triangular ones")
            for k, v in state.items() if k.endswith(".attn.mask") and not np.array_equal(v, want)]


def gpt_from_state_dict(state_dict: Mapping[str, np.ndarray], *, num_heads: int, num_classes: int = 1000,
                        dtype: Any = jnp.float32, source: str = "state dict") -> tuple[GPT, dict]:
    """(GPT, {'params': ...}) of a release state dict; every unknown, missing or mis-shaped key (and any causal mask
    that is not lower-triangular ones) is listed in one CheckpointMismatchError."""
    state = gpt_state_dict(state_dict)
    absent = [k for k in ("tok_emb.weight", "pos_emb") if k not in state]
    if absent:
        raise CheckpointMismatchError(f"{source}: missing {', '.join(absent)} (needed to read the model's sizes); "
                                      f"keys present: {', '.join(sorted(state)[:20])}")
    vocab, width = np.shape(state["tok_emb.weight"])
    block_size = np.shape(state["pos_emb"])[1]
    num_codes = vocab - num_classes
    if num_codes <= 0:
        raise ValueError(f"{source}: vocabulary of {vocab} ids cannot hold num_classes={num_classes} class ids "
                         "and at least one code")
    if width % num_heads:
        raise ValueError(f"{source}: width {width} is not divisible by num_heads={num_heads}")
    num_layers = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    model = GPT(num_codes=int(num_codes), num_classes=num_classes, block_size=int(block_size),
                num_layers=num_layers, num_heads=num_heads, width=int(width), variant="mingpt", dtype=dtype)
    template = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, block_size), jnp.int32))
    problems = []
    try:
        variables = map_state_dict(state, template, key_to_path=_key_to_path, source=source)
    except CheckpointMismatchError as err:
        problems.append(str(err))
    masks = _bad_masks(state, block_size)
    if masks:
        problems = problems or [f"{source} does not match the model:"]
        problems.append(f"  bad causal masks ({len(masks)}): " + "; ".join(sorted(masks)))
    if problems:
        raise CheckpointMismatchError("\n".join(problems))
    return model, variables


def load_official_gpt(source: str | pathlib.Path | Mapping[str, Any], *, num_heads: int, num_classes: int = 1000,
                      dtype: Any = jnp.float32) -> tuple[GPT, dict]:
    """(GPT, variables) from a release GPT checkpoint (`.pth`, `.npz` or a dict of arrays keyed by its names);
    `model.apply(variables, idx)` gives the release's logits."""
    name = "state dict" if isinstance(source, Mapping) else str(source)
    return gpt_from_state_dict(read_state_dict(source), num_heads=num_heads, num_classes=num_classes, dtype=dtype,
                               source=name)
