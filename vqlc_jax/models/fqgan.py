"""FQGAN (factorized quantization): a shared encoder trunk, one head and one sub-quantizer per sub-codebook, the
sub-codes concatenated before `post_quant_conv` and the decoder (NHWC).

    trunk = encoder(x)                                   # conv_in, levels, mid (LlamaGen's CNN = taming's)
    z_b = heads_b(trunk)                                 # FactorizedAdapter, GroupNorm, swish, 3x3 conv, 1x1 quant_conv
    zq, tokens [B, k, h, w], aux = quantizer(cat_b z_b)  # `fq`: one sub-quantizer per branch
    x' = decoder(post_quant_conv(zq))

`feat_heads_b` (a FeatPredHead) predicts a teacher's CLS feature from branch b's codes (the representation loss).
`build_fqgan(config)`: the `build_vqgan` config with `quantizer.name = 'fq'` (see `vqlc_jax.quantizers.fq`) and an
optional `fq` block: `adapter_layers` (6), `adapter_heads` (8), `feat_heads` {branch: {width, num_layers,
num_heads}}. The transformer blocks are the library's CLIP encoder layers (pre-LN, exact GELU, LayerNorm eps 1e-5).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc_jax.losses import disentanglement_loss
from vqlc_jax.models.autoencoder import Decoder, Level, MidBlock, Normalize, _Architecture, conv3x3
from vqlc_jax.models.clip import CLIPEncoder, CLIPVisionSettings
from vqlc_jax.models.vqgan import VQModel, _split_ddconfig
from vqlc_jax.quantizers import make_quantizer

Array = jax.Array
FQ_KEYS = ("adapter_layers", "adapter_heads", "feat_heads")
FEAT_HEAD_KEYS = ("width", "num_layers", "num_heads")
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, as the release


def _transformer(width: int, num_layers: int, num_heads: int) -> CLIPEncoder:
    """The release's `ResidualAttentionBlock` stack (pre-LN, MLP ratio 4, exact GELU) as CLIP encoder layers."""
    settings = CLIPVisionSettings(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=num_layers,
                                  num_attention_heads=num_heads, hidden_act="gelu", layer_norm_eps=LN_EPS)
    return CLIPEncoder(settings, name="transformer")


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


def _tokens_param(module: nn.Module, name: str, rows: int, width: int) -> Array:
    """A learned [rows, width] table initialised N(0, width^-1/2), as the release's positions and CLS token."""
    return module.param(name, nn.initializers.normal(width ** -0.5), (rows, width))


class _TokenTransformer(nn.Module):
    """The release's ViT-style tail over a token grid: + learned positions, ln_pre, transformer, ln_post."""

    grid_size: int
    num_layers: int
    num_heads: int

    def transform(self, tokens: Array, extra: int = 0) -> Array:
        """[B, extra + grid_size^2, W] -> same shape; called from a subclass's compact `__call__`."""
        if tokens.shape[1] - extra != self.grid_size ** 2:
            raise ValueError(f"{type(self).__name__}: the latent grid has {tokens.shape[1] - extra} positions, but "
                             f"its learned positions are for {self.grid_size}x{self.grid_size}: the model takes "
                             "images of the configured `resolution` only")
        tokens = tokens + _tokens_param(self, "positional_embedding", *tokens.shape[1:])
        tokens = _transformer(tokens.shape[-1], self.num_layers, self.num_heads)(_layer_norm("ln_pre")(tokens))
        return _layer_norm("ln_post")(tokens)


class FactorizedAdapter(_TokenTransformer):
    """Trunk features as tokens through `transform`: [B, h, w, C] -> [B, h, w, C]."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        return self.transform(x.reshape(b, h * w, c)).reshape(b, h, w, c)


class FeatPredHead(_TokenTransformer):
    """Codes [B, h, w, D] -> features [B, 1 + h*w, width] (token 0: the CLS, the one the representation loss uses):
    Linear D->W, ReLU, Linear W->W per token, a CLS token prepended, then `transform`."""

    width: int = 1024

    @nn.compact
    def __call__(self, codes: Array) -> Array:
        b, h, w, d = codes.shape
        dense = lambda name: nn.Dense(self.width, precision=jax.lax.Precision.HIGHEST, name=name)  # noqa: E731
        x = dense("upscale_2")(nn.relu(dense("upscale_0")(codes.reshape(b, h * w, d))))
        cls = jnp.broadcast_to(_tokens_param(self, "class_embedding", 1, self.width), (b, 1, self.width))
        return self.transform(jnp.concatenate([cls, x], axis=1), extra=1)


class BranchHead(nn.Module):
    """One sub-codebook's encoder head: adapter, GroupNorm, swish, 3x3 `conv_out` (-> z_channels), 1x1
    `quant_conv` (-> embed_dim): trunk features [B, h, w, C] -> pre-quantization latents [B, h, w, embed_dim]."""

    grid_size: int
    num_layers: int
    num_heads: int
    z_channels: int
    embed_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = FactorizedAdapter(self.grid_size, self.num_layers, self.num_heads, name="adapter")(x)
        x = conv3x3(self.z_channels, "conv_out")(nn.swish(Normalize("norm_out")(x)))
        return nn.Conv(self.embed_dim, (1, 1), name="quant_conv")(x)


class EncoderTrunk(_Architecture):
    """The encoder up to and including its middle block (no norm_out / conv_out): [B, H, W, 3] -> [B, h, w, C].

    LlamaGen's CNN is taming's with attention at the last level only: `attn_resolutions = (resolution / f,)`."""

    in_channels: int = 3
    double_z: bool = False  # a ddconfig key the trunk has no use for

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        h, res, last = conv3x3(self.ch, "conv_in")(x), self.resolution, len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            resample = "down" if i != last else None
            h = Level(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions, self.dropout, resample,
                      name=f"down_{i}")(h, train)
            res = res // 2 if resample else res
        return MidBlock(h.shape[-1], self.dropout, name="mid")(h, train)


class FQModel(VQModel):
    """Images in [-1, 1] -> (reconstructions, tokens int32 [B, k, h, w], aux); the VQModel methods, with latents
    [B, h, w, k * embed_dim] (the branches' pre-quantization latents, concatenated in branch order).

    aux: `quant_loss` (sum over branches), `z`, `disentangle_loss` (unweighted; 0 with one branch) and `branches`
    {name: {z, zq, indices [B, h, w], the sub-quantizer's losses, and `semantic_feat` [B, 1 + h*w, W] for a branch
    with a feature head}}.
    """

    adapter_layers: int = 6
    adapter_heads: int = 8
    feat_head_specs: Sequence[tuple[str, int, int, int]] = ()  # (branch, width, num_layers, num_heads)

    @property
    def grid_size(self) -> int:
        return self.decoder.resolution >> (len(self.decoder.ch_mult) - 1)

    def setup(self):
        self.heads = {name: BranchHead(self.grid_size, self.adapter_layers, self.adapter_heads,
                                       self.decoder.z_channels, self.embed_dim) for name in self.quantizer.names}
        self.feat_heads = {name: FeatPredHead(self.grid_size, layers, heads, width)
                           for name, width, layers, heads in self.feat_head_specs}
        self.post_quant_conv = nn.Conv(self.decoder.z_channels, (1, 1))

    def encode(self, images: Array, train: bool = False) -> Array:
        trunk = self.encoder(images, train)
        return jnp.concatenate([self.heads[name](trunk) for name in self.quantizer.names], axis=-1)

    def decode_indices(self, indices: Array, keep: Sequence[bool] | None = None, fill: str = "mean") -> Array:
        """Tokens [B, k, h, w] -> images; `keep` (a flag per branch) decodes from a subset of the sub-codebooks,
        the others' codes replaced by `fill` ('mean' of that codebook, or 'zero'; see `FQQuantizer.embed`)."""
        return self.decode(self.quantizer.embed(indices, keep, fill))

    def features(self, images: Array, train: bool = False):
        z = self.encode(images, train)
        zq, indices, aux = self.quantizer(z, train=train)
        branches = {}
        for i, (name, zi, zqi) in enumerate(zip(self.quantizer.names, self.quantizer.split(z),
                                                self.quantizer.split(zq))):
            branches[name] = {**aux["branches"][name], "z": zi, "zq": zqi, "indices": indices[:, i]}
            if name in self.feat_heads:
                branches[name]["semantic_feat"] = self.feat_heads[name](zqi)
        codes = [b["zq"] for b in branches.values()]
        disentangle = disentanglement_loss(codes) if len(codes) > 1 else jnp.zeros((), z.dtype)
        aux = {**aux, "z": z, "branches": branches, "disentangle_loss": disentangle}
        return self.decoder.features(self.post_quant_conv(zq), train), indices, aux


def build_fqgan(model_config: Mapping[str, Any]) -> FQModel:
    """An FQModel from a `build_vqgan` config whose quantizer is `fq` (see the module docstring)."""
    enc_kwargs, dec_kwargs = _split_ddconfig(dict(model_config["ddconfig"]))
    levels = len(enc_kwargs.get("ch_mult", _Architecture.ch_mult))
    resolution = enc_kwargs.get("resolution", _Architecture.resolution)
    if "attn_resolutions" not in enc_kwargs:  # LlamaGen: attention at the lowest resolution only
        enc_kwargs["attn_resolutions"] = dec_kwargs["attn_resolutions"] = (resolution >> (levels - 1),)
    options = dict(model_config["quantizer"])
    options.pop("name")
    embed_dim = int(model_config["embed_dim"])
    quantizer = make_quantizer("fq", embed_dim=embed_dim, **options)
    fq = dict(model_config.get("fq") or {})
    unknown = sorted(set(fq) - set(FQ_KEYS))
    if unknown:
        raise ValueError(f"model config: unknown keys fq.{unknown}; expected a subset of {list(FQ_KEYS)}")
    branch_names = [str(b["name"]) for b in options.get("branches", ())]
    feat_specs = []
    for name, head in dict(fq.get("feat_heads") or {}).items():
        head = dict(head)
        if name not in branch_names or sorted(head) != sorted(FEAT_HEAD_KEYS):
            raise ValueError(f"model config: fq.feat_heads.{name} = {head}: needs a branch among {branch_names} "
                             f"and exactly the keys {list(FEAT_HEAD_KEYS)}")
        feat_specs.append((name, *(int(head[k]) for k in FEAT_HEAD_KEYS)))
    return FQModel(EncoderTrunk(**enc_kwargs), Decoder(**dec_kwargs), quantizer, embed_dim,
                   adapter_layers=int(fq.get("adapter_layers", 6)), adapter_heads=int(fq.get("adapter_heads", 8)),
                   feat_head_specs=tuple(feat_specs))
