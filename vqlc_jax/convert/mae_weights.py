"""Read MAE's / timm's published ViT checkpoints into `vqlc_jax.models.vit.ViT`.

Accepted: a `.pth` (MAE's `{'model': state_dict}` or a bare state dict), an `.npz` (keys optionally under
`state_dict/`) or a dict of arrays, keyed `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`, `norm.*`, `fc_norm.*`, `head.*`. Width, depth, MLP ratio, token
count and class count are read off the weights; the head count cannot be and is given. As MAE's `main_finetune`:

- `patch_embed.proj.*` is skipped (the token-map classifier's token embedding replaces the patch embedding), and so
  are the pretraining decoder's `decoder_*` and `mask_token` (MAE's full pretraining checkpoints);
- with `global_pool="avg"` the model has no `norm`, and a checkpoint's `norm.*` (MAE's pretraining layout) is
  dropped; `fc_norm` and `head` may be absent (MAE's pretrain checkpoints have neither) and are then left at their
  initialisation, as is a head whose class count differs from an explicit `num_classes`;
- positions for another token count are resized bicubically on the square grid (`interpolate_pos_embed`; the CLS
  position is kept).

Any other unknown, missing or mis-shaped key is reported, all in one CheckpointMismatchError.
"""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict
from vqlc_jax.models.clip import bicubic_resize_matrix
from vqlc_jax.models.vit import ViT

_BLOCK = re.compile(r"blocks\.(\d+)\.")
_SKIPPED = ("patch_embed.", "decoder_", "mask_token")
_OPTIONAL = ("fc_norm", "head")  # left at their initialisation when the checkpoint lacks them


def resize_pos_embed(pos_embed: np.ndarray, num_tokens: int, source: str = "state dict") -> np.ndarray:
    """[1, 1 + g*g, W] -> [1, 1 + num_tokens, W]: MAE's `interpolate_pos_embed` (torch bicubic, align_corners=False)
    on the square grids; the CLS position is kept."""
    old, new = pos_embed.shape[1] - 1, num_tokens
    if old == new:
        return pos_embed
    old_side, new_side = math.isqrt(old), math.isqrt(new)
    if old_side**2 != old or new_side**2 != new:
        raise ValueError(f"{source}: cannot resize pos_embed from {old} to {new} tokens: both must be square grids")
    resize = bicubic_resize_matrix(old_side, new_side).astype(np.float64)
    grid = pos_embed[0, 1:].reshape(old_side, old_side, -1).astype(np.float64)
    grid = np.einsum("ai,bj,ijd->abd", resize, resize, grid).reshape(new, -1)
    return np.concatenate([pos_embed[:, :1], grid[None].astype(pos_embed.dtype)], axis=1)


def _key_to_path(key: str, global_pool: str):
    if key.startswith(_SKIPPED) or (global_pool == "avg" and key.startswith("norm.")):
        return None
    return default_path(key)


def vit_from_state_dict(state_dict: Mapping[str, np.ndarray], *, num_heads: int, num_classes: int | None = None,
                        global_pool: str | None = None, num_tokens: int | None = None, drop_path_rate: float = 0.0,
                        seed: int = 0, dtype: Any = jnp.float32, source: str = "state dict") -> tuple[ViT, dict]:
    """(ViT, {'params': ...}) of a timm/MAE ViT state dict (see the module docstring).

    `num_classes`: default the head's (an error without a head); `global_pool`: default "avg" when the checkpoint
    has `fc_norm`, else "token"; `num_tokens`: default the checkpoint's; `seed` initialises what the checkpoint
    lacks.
    """
    state = {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}
    absent = [k for k in ("cls_token", "pos_embed") if k not in state]
    if absent:
        raise CheckpointMismatchError(f"{source}: missing {', '.join(absent)} (needed to read the model's sizes); "
                                      f"keys present: {', '.join(sorted(state)[:20])}")
    width = state["cls_token"].shape[-1]
    has_head = "head.weight" in state
    if num_classes is None:
        if not has_head:
            raise ValueError(f"{source} has no head: give num_classes")
        num_classes = int(state["head.weight"].shape[0])
    elif has_head and state["head.weight"].shape[0] != num_classes:  # MAE drops a head of another class count
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    global_pool = global_pool or ("avg" if "fc_norm.weight" in state else "token")
    if width % num_heads:
        raise ValueError(f"{source}: width {width} is not divisible by num_heads={num_heads}")
    num_tokens = state["pos_embed"].shape[1] - 1 if num_tokens is None else num_tokens
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], num_tokens, source)
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / width if fc1 is not None else 4.0
    model = ViT(num_tokens=num_tokens, width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate, dtype=dtype)
    tokens = jax.ShapeDtypeStruct((1, num_tokens, width), jnp.float32)
    template = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), tokens))
    lacking = {p for p in template if p[1] in _OPTIONAL and not any(k.startswith(p[1] + ".") for k in state)}
    required = traverse_util.unflatten_dict({p: s for p, s in template.items() if p not in lacking})
    variables = map_state_dict(state, required, key_to_path=lambda key: _key_to_path(key, global_pool), source=source)
    if lacking:
        fresh = traverse_util.flatten_dict(model.init(jax.random.key(seed), jnp.zeros(tokens.shape)))
        variables = traverse_util.unflatten_dict({**{p: fresh[p] for p in lacking},
                                                  **traverse_util.flatten_dict(variables)})
    return model, variables


def load_official_vit(source: str | pathlib.Path | Mapping[str, Any], *, num_heads: int,
                      **options: Any) -> tuple[ViT, dict]:
    """(ViT, variables) from a MAE/timm ViT checkpoint (`.pth`, `.npz` or a dict of arrays keyed by its names);
    `options` as `vit_from_state_dict`. `model.apply(variables, token_embeddings)` gives the logits and
    `method=ViT.features` / `ViT.pooled` the intermediate outputs."""
    name = "state dict" if isinstance(source, Mapping) else str(source)
    return vit_from_state_dict(read_state_dict(source), num_heads=num_heads, source=name, **options)
