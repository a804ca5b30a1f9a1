"""DINOv2 vision tower (transformers 5 `Dinov2Model` and `Dinov2WithRegistersModel`) in Flax linen, NHWC.

Stride-p patch conv -> `[CLS, patches] + positions` -> register tokens inserted after the CLS token (when the config
has them) -> pre-norm blocks with LayerScale, `x + ls1 * attn(norm1(x))` then `x + ls2 * mlp(norm2(x))` (MLP or
SwiGLU FFN; drop path is an identity at eval and the tower is a frozen teacher, so it has none) -> final `layernorm`.
Outputs `last_hidden_state` [B, 1 + R + P, D] and `pooler_output` [B, D], its CLS token (FQGAN's teacher feature).

Position embeddings: when the patch grid differs from the native `image_size // patch_size` square, the patch
positions are resized as transformers' `interpolate_pos_encoding` does, on each axis: torch's bicubic
(align_corners=False, a = -0.75, edge-clamped: `models.clip.bicubic_resize_matrix`) for DINOv2, and torch's
antialiased bicubic (a = -0.5, taps renormalised at the edges, PIL's filter) for DINOv2 with registers.

Module names follow the Hugging Face checkpoints (`embeddings/patch_embeddings/projection`,
`encoder/layer_0/layer_scale1/lambda1`, ...); the attention uses transformers 5's `q_proj`/`k_proj`/`v_proj` and
`out_proj` (`convert.dinov2_weights` renames the checkpoints' `attention.attention.query`, ...). `from_pretrained`
reads a Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.convert.dinov2_weights import DINOV2_MODEL_TYPES, checkpoint_key_to_path
from vqlc_jax.convert.hf_checkpoint import load_params, read_config, resolve_checkpoint
from vqlc_jax.models.clip import ACTIVATIONS, HIGHEST, MLP, SelfAttention, bicubic_resize_matrix

Array = jax.Array
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation, as FQGAN's teacher applies it
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_SIZE = 224
ANTIALIAS_CUBIC_A = -0.5  # torch's antialiased bicubic (and PIL's) coefficient


@dataclasses.dataclass(frozen=True)
class Dinov2Settings:
    """The hyper-parameters of a DINOv2 tower (hashable; see `from_hf`). Defaults: `facebook/dinov2-base`."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    antialias_positions: bool = False  # DINOv2 with registers resizes its positions with antialiasing

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "Dinov2Settings":
        """From a `config.json` dict of model_type `dinov2` or `dinov2_with_registers` (transformers' defaults fill
        what it leaves out)."""
        model_type = config.get("model_type")
        if model_type not in DINOV2_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {DINOV2_MODEL_TYPES}")
        from transformers import Dinov2Config, Dinov2WithRegistersConfig

        registers = model_type == "dinov2_with_registers"
        hf = (Dinov2WithRegistersConfig if registers else Dinov2Config)(**config)
        derived = ("num_register_tokens", "antialias_positions")
        values = {f.name: getattr(hf, f.name) for f in dataclasses.fields(cls) if f.name not in derived}
        return cls(**values, num_register_tokens=hf.num_register_tokens if registers else 0,
                   antialias_positions=registers)

    @property
    def native_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def intermediate_size(self) -> int:
        """The FFN's hidden width: `int(D * mlp_ratio)`; SwiGLU keeps 2/3 of it rounded up to a multiple of 8."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden


def antialiased_bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of torch's 1-D `interpolate(mode="bicubic", antialias=True, align_corners=False)`
    (= PIL's bicubic resampling): a = -0.5, the filter widened by the scale when shrinking, taps beyond the edges
    dropped and the rest renormalised."""

    def cubic(x: np.ndarray) -> np.ndarray:
        a, x = ANTIALIAS_CUBIC_A, np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = (((x - 5) * x + 8) * x - 4) * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = cubic((taps - centre + 0.5) * inv_scale)
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix.astype(np.float32)


class Dinov2PatchEmbeddings(nn.Module):
    """Stride-p biased conv `projection`: [B, H, W, C] -> [B, (H // p) * (W // p), D], patches row-major."""

    config: Dinov2Settings
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.config
        patch = (cfg.patch_size, cfg.patch_size)
        x = nn.Conv(cfg.hidden_size, patch, strides=patch, padding="VALID", dtype=self.dtype, precision=HIGHEST,
                    name="projection")(pixel_values.astype(self.dtype))
        return x.reshape(x.shape[0], -1, cfg.hidden_size)


class Dinov2Embeddings(nn.Module):
    """`[CLS, patches] + positions` (resized for other grids), then the register tokens after the CLS token."""

    config: Dinov2Settings
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.config
        height, width = pixel_values.shape[1:3]
        rows, cols = height // cfg.patch_size, width // cfg.patch_size
        if rows == 0 or cols == 0:
            raise ValueError(f"input of {height}x{width} pixels is smaller than one {cfg.patch_size}-pixel patch")
        patches = Dinov2PatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(pixel_values)
        batch, width_d = patches.shape[0], cfg.hidden_size
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, width_d))
        table = self.param("position_embeddings", init, (1, cfg.native_grid**2 + 1, width_d))[0]
        native = cfg.native_grid
        if (rows, cols) != (native, native):
            resize = antialiased_bicubic_resize_matrix if cfg.antialias_positions else bicubic_resize_matrix
            square = table[1:].reshape(native, native, width_d).astype(jnp.float32)
            square = jnp.einsum("ai,bj,ijd->abd", resize(native, rows), resize(native, cols), square,
                                precision=HIGHEST)
            table = jnp.concatenate([table[:1], square.reshape(rows * cols, width_d).astype(table.dtype)], axis=0)
        tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width_d)), patches], axis=1)
        tokens = tokens + table.astype(self.dtype)
        if cfg.num_register_tokens:
            registers = self.param("register_tokens", nn.initializers.zeros, (1, cfg.num_register_tokens, width_d))
            registers = jnp.broadcast_to(registers.astype(self.dtype), (batch, cfg.num_register_tokens, width_d))
            tokens = jnp.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)
        return tokens


class SwiGLUFFN(nn.Module):
    """`weights_out(silu(g) * u)` with `g | u` the two halves of `weights_in(x)` (DINOv2-giant's FFN)."""

    hidden_size: int
    intermediate_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate, up = jnp.split(
            nn.Dense(2 * self.intermediate_size, dtype=self.dtype, precision=HIGHEST, name="weights_in")(x), 2, -1)
        return nn.Dense(self.hidden_size, dtype=self.dtype, precision=HIGHEST, name="weights_out")(nn.silu(gate) * up)


class LayerScale(nn.Module):
    """`x * lambda1`, a learned per-channel scale."""

    value: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x * self.param("lambda1", nn.initializers.constant(self.value), (x.shape[-1],)).astype(self.dtype)


class Dinov2Layer(nn.Module):
    """Pre-norm block with LayerScale: `x + ls1 * attn(norm1(x))`, then `x + ls2 * ffn(norm2(x))`."""

    config: Dinov2Settings
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False)
        attention = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.qkv_bias, self.dtype, name="attention")
        x = x + LayerScale(cfg.layerscale_value, self.dtype, name="layer_scale1")(attention(norm(name="norm1")(x)))
        if cfg.use_swiglu_ffn:
            ffn = SwiGLUFFN(cfg.hidden_size, cfg.intermediate_size, self.dtype, name="mlp")
        else:
            ffn = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")
        return x + LayerScale(cfg.layerscale_value, self.dtype, name="layer_scale2")(ffn(norm(name="norm2")(x)))


class Dinov2Encoder(nn.Module):
    config: Dinov2Settings
    dtype: Any = jnp.float32

    def setup(self):
        self.layer = [Dinov2Layer(self.config, self.dtype) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: Array) -> Array:
        for layer in self.layer:
            x = layer(x)
        return x


class Dinov2Model(nn.Module):
    """`Dinov2Model` on NHWC pixels (normalised; any size of at least one patch) -> {`last_hidden_state`
    [B, 1 + R + P, D] after the final layernorm, CLS first, then R registers, then the patches row-major;
    `pooler_output` [B, D]: the CLS token}."""

    config: Dinov2Settings
    dtype: Any = jnp.float32

    def setup(self):
        self.embeddings = Dinov2Embeddings(self.config, self.dtype)
        self.encoder = Dinov2Encoder(self.config, self.dtype)
        self.layernorm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype, use_fast_variance=False)

    def __call__(self, pixel_values: Array) -> dict[str, Array]:
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"expected NHWC pixel values with {self.config.num_channels} channels, got {pixel_values.shape}")
        hidden = self.layernorm(self.encoder(self.embeddings(pixel_values)))
        return {"last_hidden_state": hidden, "pooler_output": hidden[:, 0]}


def from_pretrained(path_or_hub_id: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[Dinov2Model, dict]:
    """(model, {'params': ...}) from a Hugging Face DINOv2 folder (or a hub id already in the local cache):
    `config.json` of model_type `dinov2` or `dinov2_with_registers`, plus `model.safetensors` (or
    `pytorch_model.bin`). `model.apply(variables, pixels)` gives transformers' outputs.

    Raises FileNotFoundError for a missing folder, config or weights file, ValueError for a config of another kind,
    and `CheckpointMismatchError` naming the file and every unknown, missing or mis-shaped key.
    """
    folder = resolve_checkpoint(path_or_hub_id)
    config = read_config(folder, DINOV2_MODEL_TYPES)
    settings = Dinov2Settings.from_hf(config)
    model = Dinov2Model(settings, dtype)
    side = settings.image_size
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, settings.num_channels)))
    return model, {"params": load_params(folder, template, checkpoint_key_to_path)}


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel of torch's `interpolate(mode="nearest")` on one axis:
    `min(floor(i * float32(in / out)), in - 1)` in float32, as torch computes it."""
    if in_size == out_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def teacher_inputs(images: Array, *, size: int = TEACHER_SIZE, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Array:
    """FQGAN's teacher input: NHWC images in [0, 1] resized to `size` x `size` by torch's default `interpolate`
    (nearest), then `(x - mean) / std`. Defaults are DINOv2's (ImageNet mean/std); FQGAN's CLIP teacher uses the
    same resize with `codebook.clip.CLIP_MEAN`/`CLIP_STD`. (The release feeds `x * 0.5 + 0.5` of its [-1, 1] input.)"""
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    resized = images[:, nearest_indices(images.shape[1], size)][:, :, nearest_indices(images.shape[2], size)]
    return (resized - jnp.asarray(mean, resized.dtype)) / jnp.asarray(std, resized.dtype)
