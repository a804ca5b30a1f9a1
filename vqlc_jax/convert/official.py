"""Read released VQGAN-LC checkpoints (the official PyTorch layout) into a Tokenizer, discriminator and LPIPS.

The official `VQModel` state dict holds `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`,
`tok_embeddings.weight` (the codebook, [N, Dc]) and `codebook_projection.*` (a Linear, or a Sequential MLP with
`.0`/`.2` entries), plus `discriminator.*` and `perceptual_loss.*` from the training loss. The quantizer is read off
the weights: a projection means `lc` (frozen codebook + projector), none means plain `vq` (trainable codebook).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict, strip_prefix
from vqlc_jax.models.discriminator import NLayerDiscriminator
from vqlc_jax.models.vqgan import build_vqgan

TOKENIZER_PREFIXES = ("encoder", "decoder", "quant_conv", "post_quant_conv", "tok_embeddings", "codebook_projection")
DISCRIMINATOR_PREFIX = "discriminator"
LPIPS_PREFIX = "perceptual_loss"
NPZ_STATE_DICT_PREFIX = "state_dict/"


@dataclasses.dataclass
class OfficialCheckpoint:
    """What a released checkpoint holds, converted: the tokenizer's config and variables (`vqlc_jax.Tokenizer(config,
    variables)`, or `Tokenizer.from_official_checkpoint`) and, when present, the loss networks."""

    config: dict  # the `build_vqgan` model config
    variables: dict
    discriminator: dict | None  # NLayerDiscriminator variables (params, batch_stats)
    discriminator_layers: int | None
    lpips: dict | None  # LPIPS variables; None when the file lacks the VGG16 trunk (`perceptual_loss.net.*`)


def read_state_dict(source: str | pathlib.Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A flat {official key: numpy array} from a `.pth`/`.pt`, an `.npz` (keys optionally under `state_dict/`),
    or a mapping of arrays."""
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}
    path = pathlib.Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".npz":
        with np.load(path) as data:
            keys = [k for k in data.files if k.startswith(NPZ_STATE_DICT_PREFIX)]
            if keys:
                return {k[len(NPZ_STATE_DICT_PREFIX):]: data[k] for k in keys}
            return {k: data[k] for k in data.files}
    from vqlc_jax.convert.torch_file import load_torch_file, state_dict_from_checkpoint

    return state_dict_from_checkpoint(load_torch_file(path))


def split_state_dict(state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, dict[str, np.ndarray]]:
    """Groups keys by owner: 'tokenizer', 'discriminator', 'perceptual_loss'; unknown prefixes raise."""
    groups: dict[str, dict[str, np.ndarray]] = {"tokenizer": {}, DISCRIMINATOR_PREFIX: {}, LPIPS_PREFIX: {}}
    unknown = []
    for key, value in state_dict.items():
        head = key.split(".", 1)[0]
        if head in TOKENIZER_PREFIXES:
            groups["tokenizer"][key] = value
        elif head in groups:
            groups[head][key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(f"{source}: unknown keys ({len(unknown)}): {'; '.join(sorted(unknown))}")
    return groups


def infer_model_config(state_dict: Mapping[str, np.ndarray], ddconfig: Mapping[str, Any], source: str,
                       **quantizer_options) -> dict:
    """The `build_vqgan` config of an official state dict: D' from quant_conv, the quantizer from the codebook."""
    for key in ("tok_embeddings.weight", "quant_conv.weight"):
        if key not in state_dict:
            raise CheckpointMismatchError(f"{source}: missing key {key}")
    num_codes, codebook_dim = np.shape(state_dict["tok_embeddings.weight"])
    quantizer: dict[str, Any] = {"num_codes": int(num_codes)}
    if "codebook_projection.weight" in state_dict:
        quantizer.update(name="lc", codebook_dim=int(codebook_dim), projector="linear")
    elif "codebook_projection.0.weight" in state_dict:
        quantizer.update(name="lc", codebook_dim=int(codebook_dim), projector="mlp")
    else:
        quantizer.update(name="vq")
    quantizer.update(quantizer_options)
    embed_dim = int(np.shape(state_dict["quant_conv.weight"])[0])
    return {"ddconfig": dict(ddconfig), "embed_dim": embed_dim, "quantizer": quantizer}


def _tokenizer_key_to_path(quantizer_name: str):
    """Official key -> Flax path; the codebook and projector live in the `quantizer` submodule."""
    codebook_collection = "codebook" if quantizer_name == "lc" else "params"

    def key_to_path(key: str):
        if key == "tok_embeddings.weight":
            return (codebook_collection, "quantizer", "embedding")
        path = default_path(key)
        if key.startswith("codebook_projection"):
            return (path[0], "quantizer", *path[1:])
        return path

    return key_to_path


def _discriminator_variables(state_dict: Mapping[str, np.ndarray], source: str) -> tuple[dict, int]:
    """NLayerDiscriminator variables; n_layers and ndf are read off the conv weights."""
    sub = strip_prefix(state_dict, DISCRIMINATOR_PREFIX)
    convs = sorted(int(k.split(".")[1]) for k in sub if k.endswith(".weight") and np.ndim(sub[k]) == 4)
    n_layers = len(convs) - 2
    model = NLayerDiscriminator(input_nc=int(sub["main.0.weight"].shape[1]), ndf=int(sub["main.0.weight"].shape[0]),
                                n_layers=n_layers)
    template = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    return map_state_dict(sub, template, source=f"{source} [{DISCRIMINATOR_PREFIX}.*]"), n_layers


def load_official_checkpoint(source, ddconfig: Mapping[str, Any], **quantizer_options) -> OfficialCheckpoint:
    """Converts a released VQGAN-LC checkpoint; every unknown, missing or mis-shaped key is reported at once."""
    from vqlc_jax.convert.lpips_weights import lpips_from_vqgan_lc
    from vqlc_jax.models.build import dummy_images

    name = str(source) if not isinstance(source, Mapping) else "state dict"
    groups = split_state_dict(read_state_dict(source), name)
    tok_sd = groups["tokenizer"]
    config = infer_model_config(tok_sd, ddconfig, name, **quantizer_options)
    template = jax.eval_shape(build_vqgan(config).init, jax.random.key(0), dummy_images(config))
    variables = map_state_dict(tok_sd, template, key_to_path=_tokenizer_key_to_path(config["quantizer"]["name"]),
                               source=name)
    disc, n_layers = (None, None)
    if groups[DISCRIMINATOR_PREFIX]:
        disc, n_layers = _discriminator_variables(groups[DISCRIMINATOR_PREFIX], name)
    lpips_sd = groups[LPIPS_PREFIX]
    has_trunk = any(k.startswith(f"{LPIPS_PREFIX}.net.") for k in lpips_sd)
    lpips = lpips_from_vqgan_lc(lpips_sd, source=name) if has_trunk else None
    return OfficialCheckpoint(config, variables, disc, n_layers, lpips)
