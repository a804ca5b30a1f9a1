"""Read the VQGAN-LC release's DiT (`dit-lc/models.py`, facebookresearch/DiT's) into `vqlc_jax.models.dit.DiT`.

Accepted: a `.pth` holding `{'ema': state_dict}` (what `download.py find_model` returns), a `train.py` checkpoint
(`model`, `ema`, `opt`, `args`: the EMA weights are read, as the release samples with them) or a flat state dict;
an `.npz` (keys under `state_dict/`); or a dict of arrays (flat, or a checkpoint dict holding one of them). A
`module.` prefix is stripped. Depth, width, MLP ratio, patch size, in/out channels, input size (from `pos_embed`)
and the number of classes (table rows - 1, the last row being the null class) are read off the weights; the head
count cannot be and is given. `pos_embed` is not a parameter here (the module computes the fixed sin-cos table); the checkpoint's
is checked against it.
"""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict
from vqlc_jax.models.dit import DiT, sincos_pos_embed_2d

CHECKPOINT_KEYS = ("ema", "model", "state_dict")  # the EMA weights first, as the release samples with them
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_REQUIRED = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")


def read_dit_state_dict(source: str | pathlib.Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The flat DiT state dict of a release file or dict, the EMA weights preferred, `module.` stripped."""
    from vqlc_jax.convert.torch_file import load_torch_file, state_dict_from_checkpoint

    if isinstance(source, Mapping):
        nested = {k: read_state_dict(v) for k, v in source.items() if k in CHECKPOINT_KEYS and isinstance(v, Mapping)}
        return state_dict_from_checkpoint(nested or read_state_dict(source), keys=CHECKPOINT_KEYS)
    path = pathlib.Path(source)
    if path.suffix == ".npz" or not path.is_file():
        return state_dict_from_checkpoint(read_state_dict(path), keys=CHECKPOINT_KEYS)
    return state_dict_from_checkpoint(load_torch_file(path), keys=CHECKPOINT_KEYS)


def _key_to_path(key: str):
    """Release key -> Flax path: the label table keeps its [rows, width] layout; `pos_embed` has no parameter."""
    if key == "pos_embed":
        return None
    if key == "y_embedder.embedding_table.weight":
        return ("params", "y_embedder", "embedding_table", "embedding")
    return default_path(key)


def dit_from_state_dict(state_dict: Mapping[str, np.ndarray], *, num_heads: int, dtype: Any = jnp.float32,
                        remat: bool = False, source: str = "state dict") -> tuple[DiT, dict]:
    """(DiT, {'params': ...}) of a release state dict; every unknown, missing or mis-shaped key (and a `pos_embed`
    that is not the fixed sin-cos table) is listed in one CheckpointMismatchError."""
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    absent = [k for k in _REQUIRED if k not in state]
    if absent:
        raise CheckpointMismatchError(f"{source}: missing {', '.join(absent)} (needed to read the model's sizes); "
                                      f"keys present: {', '.join(sorted(state)[:20])}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    num_patches = state["pos_embed"].shape[-2] if state["pos_embed"].ndim >= 2 else 0
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches or grid == 0:
        raise CheckpointMismatchError(f"{source}: pos_embed of shape {state['pos_embed'].shape} does not hold a "
                                      "square grid of patches")
    out_features = state["final_layer.linear.weight"].shape[0]
    out_channels = out_features // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels) or out_features % (patch * patch):
        raise CheckpointMismatchError(f"{source}: final_layer.linear.weight {state['final_layer.linear.weight'].shape}"
                                      f" gives no {in_channels} or {2 * in_channels} channels per {patch}x{patch} "
                                      "patch")
    if hidden % num_heads:
        raise ValueError(f"{source}: width {hidden} is not divisible by num_heads={num_heads}")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    model = DiT(input_size=int(grid * patch), hidden_size=int(hidden), depth=depth, num_heads=num_heads,
                patch_size=int(patch), in_channels=int(in_channels), mlp_ratio=mlp_ratio,
                num_classes=int(state["y_embedder.embedding_table.weight"].shape[0]) - 1,
                learn_sigma=out_channels == 2 * in_channels, dtype=dtype, remat=remat)
    batch = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    template = jax.eval_shape(model.init, jax.random.key(0),
                              batch((1, model.input_size, model.input_size, model.in_channels), jnp.float32),
                              batch((1,), jnp.int32), batch((1,), jnp.int32))
    problems = []
    try:
        variables = map_state_dict(state, template, key_to_path=_key_to_path, source=source)
    except CheckpointMismatchError as err:
        problems.append(str(err))
    want = sincos_pos_embed_2d(model.hidden_size, model.grid)[None]
    pos = state["pos_embed"]
    if pos.shape != want.shape or not np.allclose(pos, want, atol=1e-5):
        problems = problems or [f"{source} does not match the model:"]
        problems.append(f"  pos_embed {pos.shape} is not the fixed 2-D sin-cos table {want.shape} of DiT")
    if problems:
        raise CheckpointMismatchError("\n".join(problems))
    return model, variables


def load_official_dit(source: str | pathlib.Path | Mapping[str, Any], *, num_heads: int, dtype: Any = jnp.float32,
                      remat: bool = False) -> tuple[DiT, dict]:
    """(DiT, variables) from a release DiT checkpoint; `model.apply(variables, x, t, y)` gives the release's
    forward output in NHWC (eps channels, then the variance channels)."""
    name = "state dict" if isinstance(source, Mapping) else str(source)
    return dit_from_state_dict(read_dit_state_dict(source), num_heads=num_heads, dtype=dtype, remat=remat,
                               source=name)


def load_official_sit(source: str | pathlib.Path | Mapping[str, Any], *, num_heads: int, dtype: Any = jnp.float32,
                      remat: bool = False) -> tuple[DiT, dict]:
    """(DiT, variables) from a release SiT checkpoint (`sit-lc/models.py`: DiT's layout, read as `load_official_dit`).

    SiT's forward keeps only the first C of the 2C channels its learn_sigma head computes, so the rows of
    `final_layer.linear` that give the discarded half are dropped: the model is a `learn_sigma=False` DiT whose
    `apply(variables, x, t, y)` (t in [0, 1]) is the release's forward output in NHWC.
    """
    name = "state dict" if isinstance(source, Mapping) else str(source)
    state = read_dit_state_dict(source)
    conv, weight = state.get("x_embedder.proj.weight"), state.get("final_layer.linear.weight")
    if conv is not None and weight is not None and np.ndim(conv) == 4 and np.ndim(weight) == 2:
        patches, channels = conv.shape[2] * conv.shape[3], conv.shape[1]
        if weight.shape[0] == 2 * channels * patches:  # features ordered (p, q, channel): keep channels < C
            for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
                if key in state and np.shape(state[key])[:1] == weight.shape[:1]:  # else the mismatch is reported
                    a = np.asarray(state[key])
                    state[key] = a.reshape(patches, 2 * channels, -1)[:, :channels].reshape(-1, *a.shape[1:])
    return dit_from_state_dict(state, num_heads=num_heads, dtype=dtype, remat=remat, source=name)
