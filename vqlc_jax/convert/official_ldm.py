"""Read the VQGAN-LC release's LDM checkpoints (`ldm-lc`, CompVis latent-diffusion) into `vqlc_jax.models.unet.UNet`.

A release checkpoint is Lightning's `{'state_dict': ...}` holding `model.diffusion_model.*` (the UNet),
`model_ema.*` (LitEma's copies of the UNet: `'model_ema.' + 'diffusion_model.<name>'.replace('.', '')`, plus
`decay`/`num_updates`), `cond_stage_model.embedding.weight` (the `ClassEmbedder` table: num_classes + 1 rows, the
last the null class; not in the EMA), the DDPM schedule buffers and `first_stage_model.*` (the tokenizer). The
schedule buffers and the first stage are ignored here. By default the UNet takes the EMA weights when the file has
them, as LDM's `ema_scope` (used by `run_evaluations.py`) does; `weights='model'` takes the trained ones.

Sizes are read off the weights (channels, widths, levels, res blocks, attention levels, transformer depth, context
width, classes); the release's `unet_config` keys may be passed too and are checked against them. The head split
cannot be read off (heads x channels per head = width): `num_head_channels` (default 32, the release's) or
`num_heads`.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict
from vqlc_jax.models.unet import UNet

UNET_PREFIX = "model.diffusion_model."
EMA_UNET_PREFIX = "model_ema.diffusion_model"
CLASS_TABLE = "cond_stage_model.embedding.weight"
IGNORED_PREFIXES = ("first_stage_model.",)
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor",
    "model_ema.decay", "model_ema.num_updates",
})
# Release `UNetModel` options this UNet implements only at these values (the release's configs use them).
FIXED_OPTIONS = {"conv_resample": True, "dims": 2, "num_classes": None, "use_fp16": False,
                 "use_scale_shift_norm": False, "resblock_updown": False, "use_spatial_transformer": True,
                 "n_embed": None}
# Release options with no effect on a spatial-transformer UNet whose widths divide by the head size.
INERT_OPTIONS = ("image_size", "num_heads_upsample", "use_new_attention_order", "legacy")
READ_OFF = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
            "attention_resolutions", "transformer_depth", "context_dim")


def read_ldm_state_dict(source: str | pathlib.Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The flat state dict of a release file (`.ckpt`/`.pth` Lightning checkpoint, `.npz` with keys under
    `state_dict/`) or dict (flat, or `{'state_dict': flat}`)."""
    if isinstance(source, Mapping) and isinstance(source.get("state_dict"), Mapping):
        source = source["state_dict"]
    return read_state_dict(source)


def torch_name(path: tuple[str, ...]) -> str:
    """A UNet parameter path -> the release's name: `('input_blocks_1_0', 'in_layers_0', 'kernel')` ->
    `input_blocks.1.0.in_layers.0.weight` (the inverse of `default_path` for this module's names)."""
    *modules, leaf = path
    leaf = "weight" if leaf in ("kernel", "scale") else leaf
    return ".".join([re.sub(r"_(\d+)", r".\1", m) for m in modules] + [leaf])


def _pick_weights(state: Mapping[str, np.ndarray], weights: str | None, source: str) -> str:
    """'ema' or 'model': the UNet weights to read (None: the EMA ones when the checkpoint has them)."""
    has = {"ema": any(k.startswith(EMA_UNET_PREFIX) for k in state),
           "model": any(k.startswith(UNET_PREFIX) for k in state)}
    if weights is None:
        weights = "ema" if has["ema"] else "model"
    if weights not in has:
        raise ValueError(f"{source}: weights={weights!r}; expected 'ema', 'model' or None (EMA when present)")
    if not has[weights]:
        wanted = f"{EMA_UNET_PREFIX}*" if weights == "ema" else f"{UNET_PREFIX}*"
        raise CheckpointMismatchError(f"{source}: weights={weights!r} but no {wanted} keys; top-level names: "
                                      f"{sorted({k.split('.')[0] for k in state})}")
    return weights


def _infer_sizes(get: Callable[[str], np.ndarray | None], source: str) -> dict:
    """The UNet sizes that the release's UNet weights determine; `get(name)` returns a weight by its release name."""
    needed = ("input_blocks.0.0.weight", "out.2.weight")
    absent = [n for n in needed if get(n) is None]
    if absent:
        raise CheckpointMismatchError(f"{source}: missing UNet weights {', '.join(absent)} (needed to read its sizes)")
    mc, in_channels = get("input_blocks.0.0.weight").shape[:2]
    blocks = []  # per input block: 'down', 'res' or 'res+attn'
    while True:
        i = len(blocks) + 1
        if get(f"input_blocks.{i}.0.op.weight") is not None:
            blocks.append("down")
        elif get(f"input_blocks.{i}.0.in_layers.2.weight") is not None:
            blocks.append("res+attn" if get(f"input_blocks.{i}.1.norm.weight") is not None else "res")
        else:
            break
    levels = blocks.count("down") + 1
    if not blocks or (len(blocks) - levels + 1) % levels:
        raise CheckpointMismatchError(f"{source}: input blocks {blocks} do not form equal levels of ResBlocks "
                                      "separated by downsampling convs")
    per_level = (len(blocks) - levels + 1) // levels
    mult, attention, first = [], [], 1
    for level in range(levels):
        width = get(f"input_blocks.{first}.0.in_layers.2.weight").shape[0]
        mult.append(int(width // mc))
        if blocks[first - 1] == "res+attn":
            attention.append(2 ** level)
        first += per_level + 1
    depth = 0
    while get(f"middle_block.1.transformer_blocks.{depth}.norm1.weight") is not None:
        depth += 1
    return dict(in_channels=int(in_channels), out_channels=int(get("out.2.weight").shape[0]), model_channels=int(mc),
                channel_mult=tuple(mult), num_res_blocks=per_level, attention_resolutions=tuple(attention),
                transformer_depth=depth)


def _unet_options(sizes: dict, config: Mapping[str, Any], remat: bool, source: str) -> dict:
    """UNet keyword arguments: the read-off sizes, checked against the release `unet_config` keys given."""
    known = set(READ_OFF) | set(FIXED_OPTIONS) | set(INERT_OPTIONS) | {
        "num_head_channels", "num_heads", "dropout", "use_checkpoint"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{source}: unknown UNet option(s) {unknown}; known: {sorted(known)}")
    unsupported = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in FIXED_OPTIONS.items()
                   if k in config and config[k] != v]
    if unsupported:
        raise ValueError(f"{source}: unsupported UNet option(s): {', '.join(unsupported)}")
    conflicts = []
    for key in READ_OFF:
        if key not in config:
            continue
        given = config[key]
        if key == "channel_mult":
            given = tuple(int(m) for m in given)
        elif key == "attention_resolutions":  # factors the UNet never reaches do not count (the f16 yaml's 4)
            given = tuple(sorted(int(r) for r in given if r in [2 ** i for i in range(len(sizes["channel_mult"]))]))
        if given != sizes[key]:
            conflicts.append(f"{key}={config[key]!r} but the weights hold {sizes[key]!r}")
    if conflicts:
        raise CheckpointMismatchError(f"{source}: the given UNet config does not match the weights: "
                                      + "; ".join(conflicts))
    head_channels, heads = config.get("num_head_channels", -1), config.get("num_heads", -1)
    if head_channels == -1 and heads == -1:
        head_channels = 32
    return dict(sizes, num_head_channels=None if head_channels == -1 else int(head_channels),
                num_heads=None if head_channels != -1 else int(heads), dropout=float(config.get("dropout", 0.0)),
                remat=remat or bool(config.get("use_checkpoint", False)))


def ldm_from_state_dict(state_dict: Mapping[str, np.ndarray], *, weights: str | None = None, dtype: Any = jnp.float32,
                        remat: bool = False, source: str = "state dict", **unet_config) -> tuple[UNet, dict]:
    """(UNet, {'params': ...}) of a release LDM state dict. `weights`: 'ema', 'model' or None (EMA when present).
    Every unknown, missing or mis-shaped key is listed in one CheckpointMismatchError."""
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    weights = _pick_weights(state, weights, source)
    prefix = UNET_PREFIX if weights == "model" else EMA_UNET_PREFIX
    to_key = (lambda n: prefix + n) if weights == "model" else (lambda n: prefix + n.replace(".", ""))
    if CLASS_TABLE not in state:
        raise CheckpointMismatchError(f"{source}: missing {CLASS_TABLE} (the class embedding: the context width and "
                                      "the number of classes)")
    table = state[CLASS_TABLE]
    sizes = dict(_infer_sizes(lambda n: state.get(to_key(n)), source), context_dim=int(table.shape[1]))
    model = UNet(**_unet_options(sizes, unet_config, remat, source), num_classes=int(table.shape[0]) - 1, dtype=dtype)
    size = model.downsample_factor
    batch = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    template = jax.eval_shape(model.init, jax.random.key(0), batch((1, size, size, model.in_channels), jnp.float32),
                              batch((1,), jnp.int32), batch((1,), jnp.int32))

    torch_names = (torch_name(path[1:]) for path in traverse_util.flatten_dict(template) if path[1] != "class_embedder")
    names = {to_key(n): n for n in torch_names}  # checkpoint key -> release name
    other = "model_ema." if weights == "model" else "model."  # the UNet copy not read
    unet, unknown = {}, []
    for key, value in state.items():
        if key in names or key == CLASS_TABLE:
            unet[key] = value
        elif key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES + (other,)):
            continue
        else:  # under the chosen weights' namespace but no parameter of this UNet, or no part of an LDM checkpoint
            unknown.append(key)

    def key_to_path(key):
        if key == CLASS_TABLE:
            return ("params", "class_embedder", "embedding")
        return default_path(names[key])

    problems = []
    try:
        variables = map_state_dict(unet, template, key_to_path=key_to_path, source=source)
    except CheckpointMismatchError as err:
        problems.append(str(err))
    if unknown:
        problems = problems or [f"{source} does not match the model:"]
        problems.append(f"  unknown checkpoint keys ({len(unknown)}): " + "; ".join(sorted(unknown)))
    if problems:
        raise CheckpointMismatchError("\n".join(problems))
    return model, variables


def load_official_ldm(source: str | pathlib.Path | Mapping[str, Any], *, weights: str | None = None,
                      dtype: Any = jnp.float32, remat: bool = False, **unet_config) -> tuple[UNet, dict]:
    """(UNet, variables) from a release LDM checkpoint; `model.apply(variables, x, t, y)` is the release's
    `apply_model(x, t, get_learned_conditioning({'class_label': y}))` in NHWC. `unet_config`: the release's
    `unet_config.params` keys (checked against the weights; `num_head_channels`/`num_heads` set the heads)."""
    name = "state dict" if isinstance(source, Mapping) else str(source)
    return ldm_from_state_dict(read_ldm_state_dict(source), weights=weights, dtype=dtype, remat=remat, source=name,
                               **unet_config)
