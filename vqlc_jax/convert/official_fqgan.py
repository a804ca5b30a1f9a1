"""Read released FQGAN tokenizers (showlab/FQGAN `tokenizer/vq_model_{dual,triple}.py`, `VQModel`) into a Tokenizer.

Branches are named after the release's suffixes and ordered as it concatenates the sub-codes: Dual ("vis", "sem"),
Triple ("vis", "sem_mid", "sem_high"). The architecture is read off the weights (ch, ch_mult, res blocks, z_channels,
resolution from the adapter's positions, adapter and feature-head depth and width, codebook sizes and dim); the
attention head counts are not in the weights (`adapter_heads`, `feat_heads`, 8 as released). Key mapping:
`encoder.conv_blocks.i.res.j` -> `encoder/down_i/block_j`, `decoder.conv_blocks.j` -> `decoder/up_{L-1-j}` (the
release builds its decoder from the lowest resolution), `mid.0/1/2` -> `mid/block_1, attn_1, block_2`,
`encoder.{visual,semantic}_head*.0` -> `heads_<b>/adapter`, `encoder.{norm,conv}_out_<b>` and `quant_conv_<b>` ->
`heads_<b>/...`, `quantize_<b>.embedding.weight` -> `quantizer/<b>/embedding`, the feature heads (`feat_pred_head`,
`{mid,high}_sem_feat_pred`) -> `feat_heads_<b>`; `nn.MultiheadAttention.in_proj_*` is split into q/k/v; the
`codebook_used` buffers (a usage log) are skipped.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict

BRANCH_ORDER = ("vis", "sem", "sem_mid", "sem_high")
FEAT_HEAD_PREFIXES = {"feat_pred_head": "sem", "mid_sem_feat_pred": "sem_mid", "high_sem_feat_pred": "sem_high"}
RELEASE_HEADS = {"vis": "visual_head", "sem": "semantic_head", "sem_mid": "semantic_head_mid",
                 "sem_high": "semantic_head_high"}
_BLOCK_RENAMES = ((r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."), (r"\.attn\.", ".self_attn."),
                  (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
                  (r"\.transformer\.(\d+)\.", r".transformer.layers.\1."))
_MID = {"0": "block.1", "1": "attn.1", "2": "block.2"}


def _split_in_proj(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`attn.in_proj_{weight,bias}` ([3W, ...], rows q; k; v) -> `attn.{q,k,v}_proj.{weight,bias}`."""
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.attn)\.in_proj_(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
            out[f"{match[1]}.{name}_proj.{match[2]}"] = part
    return out


def _renamed(key: str, levels: int) -> str | None:
    """The torch-style key of the Flax model (numeric segments as `default_path` joins them), or None to skip."""
    if key.endswith(".codebook_used"):
        return None
    key = re.sub(r"^(encoder|decoder)\.mid\.(\d)\.", lambda m: f"{m[1]}.mid.{_MID[m[2]]}.", key)
    key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    key = re.sub(r"^decoder\.conv_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.res\.", r"decoder.up.\1.block.", key)
    for branch, head in RELEASE_HEADS.items():
        key = re.sub(rf"^encoder\.{head}\.0\.", f"heads_{branch}.adapter.", key)
    key = re.sub(r"^encoder\.(norm_out|conv_out)_(\w+?)\.(weight|bias)$", r"heads_\2.\1.\3", key)
    key = re.sub(r"^quant_conv_(\w+?)\.(weight|bias)$", r"heads_\1.quant_conv.\2", key)
    for prefix, branch in FEAT_HEAD_PREFIXES.items():
        key = re.sub(rf"^{prefix}\.", f"feat_heads_{branch}.", key)
    if key.startswith(("heads_", "feat_heads_")):
        for pattern, replacement in _BLOCK_RENAMES:
            key = re.sub(pattern, replacement, key)
    return key


def _key_to_path(levels: int):
    def key_to_path(key: str):
        match = re.fullmatch(r"quantize_(\w+)\.embedding\.weight", key)
        if match:
            return ("params", "quantizer", match[1], "embedding")
        renamed = _renamed(key, levels)
        return None if renamed is None else default_path(renamed)

    return key_to_path


def _count(state_dict: Mapping[str, Any], pattern: str) -> int:
    """How many distinct integers fill the `(\\d+)` of `pattern` across the keys."""
    return len({m[1] for k in state_dict if (m := re.match(pattern, k))})


def checkpoint_branches(state_dict: Mapping[str, Any], source: str) -> list[str]:
    """The sub-codebooks of a release state dict (`quantize_<b>.embedding.weight`), in the release's order."""
    found = [m[1] for k in state_dict if (m := re.fullmatch(r"quantize_(\w+)\.embedding\.weight", k))]
    unknown = sorted(set(found) - set(BRANCH_ORDER))
    if not found or unknown:
        raise CheckpointMismatchError(f"{source}: expected FQGAN sub-quantizers `quantize_<b>.embedding.weight` with b "
                                      f"in {BRANCH_ORDER}; found {sorted(found) or 'none'}")
    return sorted(found, key=BRANCH_ORDER.index)


def infer_fqgan_config(state_dict: Mapping[str, np.ndarray], source: str, *, adapter_heads: int = 8,
                       feat_heads: int = 8, **quantizer_options) -> dict:
    """The `build_model` config (quantizer `fq` of `l2vq` branches) of a release state dict."""
    needed = ("encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight", "decoder.conv_in.weight",
              "decoder.conv_out.weight", "encoder.visual_head.0.positional_embedding")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(f"{source}: not an FQGAN tokenizer state dict; missing {missing}")
    branches = checkpoint_branches(state_dict, source)
    shape = lambda key: tuple(np.shape(state_dict[key]))  # noqa: E731
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _count(state_dict, r"encoder\.conv_blocks\.(\d+)\.")
    ch_mult = [shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] // ch for i in range(levels)]
    grid = int(round(shape("encoder.visual_head.0.positional_embedding")[0] ** 0.5))
    resolution = grid << (levels - 1)
    ddconfig = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=_count(state_dict, r"encoder\.conv_blocks\.0\.res\.(\d+)\."),
                    z_channels=shape("decoder.conv_in.weight")[1], resolution=resolution, in_channels=in_channels,
                    out_ch=shape("decoder.conv_out.weight")[0], attn_resolutions=[grid], dropout=0.0)
    num_codes = {b: shape(f"quantize_{b}.embedding.weight")[0] for b in branches}
    embed_dim = shape(f"quantize_{branches[0]}.embedding.weight")[1]
    feat = {}
    for prefix, branch in FEAT_HEAD_PREFIXES.items():
        if f"{prefix}.class_embedding" in state_dict:
            feat[branch] = dict(width=shape(f"{prefix}.class_embedding")[1], num_heads=feat_heads,
                                num_layers=_count(state_dict, rf"{prefix}\.transformer\.(\d+)\."))
    return {
        "ddconfig": ddconfig,
        "embed_dim": embed_dim,
        "quantizer": {"name": "fq", "branches": [
            {"name": b, "quantizer": {"name": "l2vq", "num_codes": num_codes[b], **quantizer_options}}
            for b in branches]},
        "fq": {"adapter_layers": _count(state_dict, r"encoder\.visual_head\.0\.transformer\.(\d+)\."),
               "adapter_heads": adapter_heads, "feat_heads": feat},
    }


def load_official_fqgan(source, config: Mapping[str, Any] | None = None, *, adapter_heads: int = 8,
                        feat_heads: int = 8, **quantizer_options):
    """(model config, variables) of a released FQGAN checkpoint (`vqlc_jax.tokenizer.from_official_fqgan` makes the
    `Tokenizer`): `.pth` (`{'model': state_dict}`), `.npz` (keys optionally
    under `state_dict/`) or a dict of arrays. The config is read off the weights unless `config` is given (then the
    checkpoint must fit it); `quantizer_options` go to every `l2vq` branch (e.g. `entropy_weight`). Every branch,
    unknown, missing or mis-shaped key that does not fit is reported in one CheckpointMismatchError."""
    from vqlc_jax.models.build import build_model, dummy_images

    name = str(source) if not isinstance(source, Mapping) else "state dict"
    state_dict = read_state_dict(source)
    if config is None:
        config = infer_fqgan_config(state_dict, name, adapter_heads=adapter_heads, feat_heads=feat_heads,
                                    **quantizer_options)
    problems = []
    wanted = [str(b["name"]) for b in config["quantizer"]["branches"]]
    found = checkpoint_branches(state_dict, name)
    if wanted != found:
        problems.append(f"{name}: the checkpoint has {len(found)} sub-codebooks {found}, the config {len(wanted)} "
                        f"{wanted}")
    template = jax.eval_shape(build_model(config).init, jax.random.key(0), dummy_images(config))
    levels = len(config["ddconfig"]["ch_mult"])
    try:
        variables = map_state_dict(_split_in_proj(state_dict), template, key_to_path=_key_to_path(levels),
                                   source=name)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError("\n".join([*problems, str(err)])) from None
    if problems:
        raise CheckpointMismatchError("\n".join(problems))
    return config, variables
