"""CLIP vision tower (Hugging Face `CLIPVisionModelWithProjection`) in Flax linen, NHWC.

Submodules are named after the Hugging Face ones, so torch keys map mechanically with `convert.torch_layout`
(`vision_model.encoder.layers.0.mlp.fc1.weight` -> `params/vision_model/encoder/layers_0/mlp/fc1/kernel`); the one
exception is the position table, an `nn.Embed` whose leaf is `embedding` where torch says `weight`.

Inputs of any square size that the patch size divides are accepted. When the patch grid differs from the native
`image_size // patch_size`, the patch position embeddings are resized like transformers'
`interpolate_pos_encoding`: torch `F.interpolate(mode="bicubic", align_corners=False)` (Keys cubic, a = -0.75,
half-pixel centres, edge-clamped, no antialiasing) on the square grid; the CLS position is kept. The VQGAN-LC recipe
(ViT-L/14 at 224 px) uses the native 16x16 grid, where nothing is interpolated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
BICUBIC_A = -0.75  # torch's cubic convolution coefficient

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionSettings:
    """The hyper-parameters of a CLIP vision tower (hashable; see `from_hf`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_hf(cls, config: Any) -> "CLIPVisionSettings":
        """From a transformers `CLIPVisionConfig` or `CLIPConfig`, or the dict of either (`config.json`).

        For a full `CLIPConfig` the vision sub-config is used, with the top-level `projection_dim` (the size of
        `CLIPModel.visual_projection`).
        """
        from transformers import CLIPConfig, CLIPVisionConfig

        if isinstance(config, Mapping):
            is_full = "vision_config" in config or config.get("model_type") == "clip"
            config = CLIPConfig(**config) if is_full else CLIPVisionConfig(**config)
        projection_dim = None
        if isinstance(config, CLIPConfig):
            projection_dim = config.projection_dim
            config = config.vision_config
        if not isinstance(config, CLIPVisionConfig):
            raise TypeError(f"expected a CLIPVisionConfig, CLIPConfig or dict, got {type(config).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: getattr(config, name) for name in names}
        if projection_dim is not None:
            values["projection_dim"] = projection_dim
        return cls(**values)

    @property
    def native_grid(self) -> int:
        return self.image_size // self.patch_size

    def grid_size(self, height: int, width: int) -> int:
        """The patch grid side for an input of `height` x `width` pixels; ValueError unless square and divisible."""
        if height != width or height % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not supported: CLIP needs square inputs whose side is a multiple of "
                f"the patch size {self.patch_size} (native {self.image_size}x{self.image_size})"
            )
        return height // self.patch_size


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of torch's 1-D bicubic interpolation (align_corners=False, edges clamped)."""

    def cubic(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1
        far = ((BICUBIC_A * x - 5 * BICUBIC_A) * x + 8 * BICUBIC_A) * x - 4 * BICUBIC_A
        return np.where(x <= 1, near, np.where(x < 2, far, 0.0))

    source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    floor = np.floor(source)
    taps = floor[:, None] + np.arange(-1, 3)[None, :]  # 4 taps per output
    weights = cubic(source[:, None] - taps)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size)[:, None], np.clip(taps, 0, in_size - 1).astype(int)), weights)
    return matrix.astype(np.float32)


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + (possibly interpolated) position embeddings -> [B, 1 + g*g, D]."""

    config: CLIPVisionSettings
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        grid = cfg.grid_size(pixel_values.shape[1], pixel_values.shape[2])
        patch = (cfg.patch_size, cfg.patch_size)
        patches = nn.Conv(
            cfg.hidden_size, patch, strides=patch, padding="VALID", use_bias=False, dtype=self.dtype,
            precision=HIGHEST, name="patch_embedding",
        )(pixel_values)
        batch = patches.shape[0]
        patches = patches.reshape(batch, grid * grid, cfg.hidden_size)
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,)
        )
        table = nn.Embed(cfg.native_grid**2 + 1, cfg.hidden_size, name="position_embedding").embedding
        if grid != cfg.native_grid:
            resize = jnp.asarray(bicubic_resize_matrix(cfg.native_grid, grid))
            square = table[1:].reshape(cfg.native_grid, cfg.native_grid, cfg.hidden_size)
            square = jnp.einsum("ai,bj,ijd->abd", resize, resize, square, precision=HIGHEST)
            table = jnp.concatenate([table[:1], square.reshape(grid * grid, cfg.hidden_size)], axis=0)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + table.astype(self.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (`q_proj`, `k_proj`, `v_proj`, biased unless
    `qkv_bias=False`) and a biased `out_proj`; softmax in float32. Shared by the CLIP and DINOv2 towers."""

    hidden_size: int
    num_heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, width = self.num_heads, self.hidden_size // self.num_heads
        dense = functools.partial(nn.Dense, self.hidden_size, dtype=self.dtype, precision=HIGHEST)

        def split(name: str) -> jax.Array:
            return dense(use_bias=self.qkv_bias, name=name)(x).reshape(*x.shape[:-1], heads, width)

        q, k, v = split("q_proj") * width**-0.5, split("k_proj"), split("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=HIGHEST).reshape(x.shape)
        return dense(name="out_proj")(out)


class MLP(nn.Module):
    """`fc2(act(fc1(x)))` with `act` one of ACTIVATIONS. Shared by the CLIP, DINOv2 and ViT models."""

    hidden_size: int
    intermediate_size: int
    activation: str
    dtype: Any = jnp.float32
    precision: Any = HIGHEST
    kernel_init: Callable = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision, kernel_init=self.kernel_init)
        x = ACTIVATIONS[self.activation](dense(self.intermediate_size, name="fc1")(x))
        return dense(self.hidden_size, name="fc2")(x)


def _layer_norm(config: CLIPVisionSettings, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPVisionSettings
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        attention = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, dtype=self.dtype, name="self_attn")
        x = x + attention(_layer_norm(cfg, self.dtype, "layer_norm1")(x))
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")
        return x + mlp(_layer_norm(cfg, self.dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The stack of encoder layers; runs only the first `num_layers` (all when None)."""

    config: CLIPVisionSettings
    dtype: Any = jnp.float32

    def setup(self):
        self.layers = [CLIPEncoderLayer(self.config, self.dtype) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, num_layers: int | None = None) -> jax.Array:
        for layer in self.layers[:num_layers]:
            x = layer(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """embeddings -> pre_layrnorm -> encoder; `post_layernorm` is applied by the caller (see CLIPVisionTower)."""

    config: CLIPVisionSettings
    dtype: Any = jnp.float32

    def setup(self):
        self.embeddings = CLIPVisionEmbeddings(self.config, self.dtype)
        self.pre_layrnorm = _layer_norm(self.config, self.dtype, None)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.post_layernorm = _layer_norm(self.config, self.dtype, None)

    def __call__(self, pixel_values: jax.Array, num_layers: int | None = None) -> jax.Array:
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), num_layers)


def hidden_state_index(layer: int, num_hidden_layers: int) -> int:
    """Position of `layer` in transformers' `hidden_states` tuple (length num_hidden_layers + 1).

    0 is `pre_layrnorm(embeddings)`, i the output of encoder layer i (1-based), -1 the last layer
    (= `last_hidden_state`), -2 the penultimate layer's output.
    """
    count = num_hidden_layers + 1
    if not -count <= layer < count:
        raise ValueError(f"layer {layer} out of range for {num_hidden_layers} encoder layers ([{-count}, {count - 1}])")
    return layer % count


class CLIPVisionTower(nn.Module):
    """CLIP vision model (+ `visual_projection`, no bias, when `with_projection`), NHWC pixels.

    Returns `(hidden, features)`: `hidden` = `hidden_states[layer]` [B, 1 + P, D] in transformers' sense (raw
    encoder output, CLS first; see `hidden_state_index`), and `features` [B, P, projection_dim or D] = the patch
    tokens of `hidden` (CLS dropped) through `post_layernorm` and `visual_projection`, each step switchable
    (`apply_projection=None`: whenever the tower has the projection).
    """

    config: CLIPVisionSettings
    with_projection: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.vision_model = CLIPVisionTransformer(self.config, self.dtype)
        if self.with_projection:
            self.visual_projection = nn.Dense(
                self.config.projection_dim, use_bias=False, dtype=self.dtype, precision=HIGHEST
            )

    def __call__(
        self,
        pixel_values: jax.Array,
        layer: int = -1,
        apply_post_layernorm: bool = True,
        apply_projection: bool | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        apply_projection = self.with_projection if apply_projection is None else apply_projection
        if apply_projection and not self.with_projection:
            raise ValueError("apply_projection=True needs a tower built with_projection=True")
        hidden = self.vision_model(pixel_values, hidden_state_index(layer, self.config.num_hidden_layers))
        features = hidden[:, 1:]
        if apply_post_layernorm:
            features = self.vision_model.post_layernorm(features)
        if apply_projection:
            features = self.visual_projection(features)
        return hidden, features
