"""The VQGAN autoencoder: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (NHWC).

`build_vqgan(model_config)` makes one from a config with the official `ddconfig` keys, `embed_dim` (D') and a
`quantizer` block whose `name` picks the quantizer from the registry (`lc`, `vq`, `fc`, `ema`, `l2vq`); for `fq`
(FQGAN's factorized quantization) `vqlc_jax.models.build.build_model` makes a `vqlc_jax.models.fqgan.FQModel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax

from vqlc_jax.models.autoencoder import Decoder, Encoder
from vqlc_jax.quantizers import make_quantizer

# Official taming `ddconfig` keys and which module takes them.
DDCONFIG_KEYS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                 "num_res_blocks", "attn_resolutions", "dropout")


class VQModel(nn.Module):
    """Images in [-1, 1] -> (reconstructions, token indices [B, h, w], aux with `quant_loss`)."""

    encoder: Encoder
    decoder: Decoder
    quantizer: nn.Module
    embed_dim: int

    def setup(self):
        self.quant_conv = nn.Conv(self.embed_dim, (1, 1))
        self.post_quant_conv = nn.Conv(self.decoder.z_channels, (1, 1))

    def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Pre-quantization latents [B, h, w, D']."""
        return self.quant_conv(self.encoder(images, train))

    def decode(self, zq: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents [B, h, w, D'] -> images."""
        return self.decoder(self.post_quant_conv(zq), train)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """Images -> int32 token indices [B, h, w] (evaluation mode)."""
        return self.quantizer(self.encode(images))[1]

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Token indices [B, h, w] -> images."""
        return self.decode(self.quantizer.embed(indices))

    def quantize_latents(self, z: jax.Array) -> jax.Array:
        """Pre-quantization latents [B, h, w, D'] -> token indices [B, h, w] (the nearest codes)."""
        return self.quantizer(z)[1]

    def decode_latents(self, z: jax.Array, quantize: bool = True) -> jax.Array:
        """Latents [B, h, w, D'] (e.g. a diffusion model's samples) -> images: through the nearest codes as the
        release decodes them, or directly (`quantize=False`)."""
        return self.decode(self.quantizer(z)[0] if quantize else z)

    def features(self, images: jax.Array, train: bool = False):
        """Everything up to the decoder's last conv: (h, indices, aux); `head(h)` gives the reconstruction."""
        z = self.encode(images, train)
        zq, indices, aux = self.quantizer(z, train=train)
        return self.decoder.features(self.post_quant_conv(zq), train), indices, {**aux, "z": z}

    def head(self, h: jax.Array) -> jax.Array:
        """The decoder's last conv: features -> images."""
        return self.decoder.head(h)

    def __call__(self, images: jax.Array, train: bool = False):
        h, indices, aux = self.features(images, train)
        return self.head(h), indices, aux


def _split_ddconfig(ddconfig: Mapping[str, Any]) -> tuple[dict, dict]:
    unknown = sorted(set(ddconfig) - set(DDCONFIG_KEYS))
    if unknown:
        raise ValueError(f"ddconfig: unknown keys {unknown}; expected a subset of {list(DDCONFIG_KEYS)}")

    def pick(cls) -> dict:
        names = {f.name for f in dataclasses.fields(cls)}
        out = {k: v for k, v in ddconfig.items() if k in names}
        for k in ("ch_mult", "attn_resolutions"):
            if k in out:
                out[k] = tuple(out[k])
        return out

    return pick(Encoder), pick(Decoder)


def check_model_config(model_config: Mapping[str, Any]) -> None:
    """Raises naming the first of `ddconfig`, `embed_dim`, `quantizer` that the model config lacks."""
    for key in ("ddconfig", "embed_dim", "quantizer"):
        if key not in model_config:
            raise ValueError(f"model config: missing key {key!r}")


def build_vqgan(model_config: Mapping[str, Any]) -> VQModel:
    """A VQModel from `{'ddconfig': {...}, 'embed_dim': D', 'quantizer': {'name': ..., **options}}`."""
    check_model_config(model_config)
    if dict(model_config["quantizer"]).get("name") == "fq":
        raise ValueError("model config: quantizer 'fq' makes an FQModel; build it with "
                         "vqlc_jax.models.build.build_model")
    enc_kwargs, dec_kwargs = _split_ddconfig(dict(model_config["ddconfig"]))
    options = dict(model_config["quantizer"])
    name = options.pop("name", None)
    if name is None:
        raise ValueError("model config: quantizer.name is missing (one of the registered quantizers)")
    quantizer = make_quantizer(name, embed_dim=int(model_config["embed_dim"]), **options)
    return VQModel(Encoder(**enc_kwargs), Decoder(**dec_kwargs), quantizer, int(model_config["embed_dim"]))
