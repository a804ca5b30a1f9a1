"""CLIP patch features for the VQGAN-LC codebook, from Hugging Face CLIP checkpoints, offline.

Recipe (official VQGAN-LC): OpenAI CLIP ViT-L/14 at 224 px; `post_layernorm` and `visual_projection` on every patch
token (16x16 x 768); the grid 4x4 average-pooled to 16 vectors per image. `preprocess` reproduces transformers'
`CLIPImageProcessor` (PIL backend) in numpy/PIL; `CLIPFeatureExtractor` runs the Flax tower of `models.clip`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vqlc_jax.convert.hf_checkpoint import load_params, read_config, resolve_checkpoint
from vqlc_jax.convert.torch_layout import default_path
from vqlc_jax.models.clip import CLIPVisionSettings, CLIPVisionTower, hidden_state_index

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as transformers' OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PREPROCESSING = {"image_size": 224, "crop_size": 224, "mean": CLIP_MEAN, "std": CLIP_STD}
PREPROCESSOR_NAME = "preprocessor_config.json"
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
# Top-level modules of transformers 5's flat `CLIPVisionModel` (other checkpoints nest them under `vision_model.`).
_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


# ----------------------------------------------------------------------------------------------- preprocessing
def _resize_crop(image: np.ndarray, image_size: int, crop_size: int) -> np.ndarray:
    """One HWC image -> [crop, crop, 3] float32 in [0, 1] scale: PIL bicubic shortest-edge resize, centre crop."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    height, width = image.shape[:2]
    short, long = sorted((height, width))
    new_long = int(image_size * long / short)  # truncation, as transformers' get_resize_output_image_size
    new_h, new_w = (new_long, image_size) if height > width else (image_size, new_long)
    if image.dtype == np.uint8:
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    elif np.issubdtype(image.dtype, np.floating):
        channels = [Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)) for c in range(3)]
        resized = np.stack([np.asarray(c.resize((new_w, new_h), Image.BICUBIC)) for c in channels], axis=-1)
        resized = np.clip(resized, 0.0, 1.0)  # PIL's 8-bit resize clips its overshoot too
    else:
        raise TypeError(f"images must be uint8 or floating point, got {image.dtype}")
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    crop = resized[top : top + crop_size, left : left + crop_size]
    if crop.dtype == np.uint8:
        return (crop.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale, bit for bit
    return crop


def preprocess(
    images: np.ndarray | Sequence[np.ndarray],
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    crop_size: int | None = None,
) -> np.ndarray:
    """RGB images (NHWC array, or a sequence of HWC arrays of any sizes) -> normalised [B, crop, crop, 3] float32.

    As transformers' `CLIPImageProcessor`: resize the shorter side to `image_size` (PIL bicubic, longer side
    `int(image_size * long / short)`), centre crop `crop_size` (default `image_size`), rescale by 1/255, normalise
    `(x - mean) / std` in float32. uint8 input matches transformers exactly. Floating input is taken to be in
    [0, 1], resized per channel in PIL's 32-bit float mode and clipped to [0, 1], with none of the 8-bit rounding
    and clipping PIL's uint8 path applies after each of its two passes: `preprocess(u8 / 255)` differs from
    `preprocess(u8)` by about 0.3 grey levels on average and a few (5 on skimage's astronaut) at sharp edges.
    """
    crop_size = image_size if crop_size is None else crop_size
    if not 0 < crop_size <= image_size:
        raise ValueError(f"crop_size {crop_size} must be in (0, image_size={image_size}]")
    batch = np.stack([_resize_crop(np.asarray(image), image_size, crop_size) for image in images])
    return (batch - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _square_side(value: Any, file: Path, key: str) -> int:
    """An int size, or {'shortest_edge': n} (size), or {'height': n, 'width': n} (crop)."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if key == "size" and "shortest_edge" in value:
            return int(value["shortest_edge"])
        if key == "crop_size" and "height" in value and value["height"] == value.get("width"):
            return int(value["height"])
    raise ValueError(f"{file}: unsupported {key} {value!r} (expected a shortest edge and a square crop)")


def preprocessing_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """`preprocess` keyword arguments from `folder/preprocessor_config.json`; OpenAI CLIP defaults without it."""
    file = Path(folder) / PREPROCESSOR_NAME
    if not file.is_file():
        return dict(DEFAULT_PREPROCESSING)
    cfg = json.loads(file.read_text())
    size = _square_side(cfg.get("size", 224), file, "size")
    return {
        "image_size": size,
        "crop_size": _square_side(cfg.get("crop_size", size), file, "crop_size"),
        "mean": tuple(cfg.get("image_mean", CLIP_MEAN)),
        "std": tuple(cfg.get("image_std", CLIP_STD)),
    }


# ----------------------------------------------------------------------------------------------- checkpoints
def read_vision_config(folder: Path) -> CLIPVisionSettings:
    """The vision tower's settings from `folder/config.json` (a CLIPVisionConfig or a full CLIPConfig)."""
    return CLIPVisionSettings.from_hf(read_config(folder, CLIP_MODEL_TYPES))


def checkpoint_key_to_path(key: str, *, with_projection: bool = True) -> tuple[str, ...] | None:
    """A `CLIPVisionModelWithProjection` / `CLIPModel` / `CLIPVisionModel` (torch or FlaxCLIP) key -> Flax path.

    Text-tower keys, `logit_scale`, `position_ids` buffers and (without projection) `visual_projection` are
    skipped; the position table's `weight` becomes the `nn.Embed` leaf `embedding`.
    """
    if key.startswith(_VISION_ROOTS):
        key = "vision_model." + key
    keep = key.startswith("vision_model.") or (with_projection and key.startswith("visual_projection."))
    if not keep or key.endswith(".position_ids"):
        return None
    if key.endswith("position_embedding.weight"):
        key = key.removesuffix("weight") + "embedding"
    return default_path(key)


def load_vision_params(folder: Path, template: Mapping, *, with_projection: bool = True) -> dict:
    """The tower's `params` from the folder's weights file (`hf_checkpoint.load_params`), checked against `template`."""
    return load_params(folder, template, lambda key: checkpoint_key_to_path(key, with_projection=with_projection))


def load_vision_tower(path_or_hub_id: str | os.PathLike, *,
                      with_projection: bool = True) -> tuple[Path, CLIPVisionSettings, dict]:
    """(folder, settings, params) of the vision tower in a Hugging Face CLIP folder (errors: see
    `CLIPFeatureExtractor.from_pretrained`); `CLIPVisionTower(settings, with_projection)` applies the params."""
    folder = resolve_checkpoint(path_or_hub_id)
    config = read_vision_config(folder)
    module = CLIPVisionTower(config, with_projection=with_projection)
    side = config.image_size
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, side, side, config.num_channels)))
    return folder, config, load_vision_params(folder, template, with_projection=with_projection)


# ----------------------------------------------------------------------------------------------- features
def pool_patches(features: jax.Array, pool: int) -> jax.Array:
    """[B, g*g, C] row-major patch grid -> [B, (g/pool)^2, C]: `pool` x `pool` average pooling, row-major."""
    batch, count, channels = features.shape
    grid = math.isqrt(count)
    if grid * grid != count or grid % pool:
        raise ValueError(f"pool {pool} does not divide the {grid}x{grid} patch grid ({count} patches)")
    cells = grid // pool
    pooled = features.reshape(batch, cells, pool, cells, pool, channels).mean(axis=(2, 4))
    return pooled.reshape(batch, cells * cells, channels)


class CLIPFeatureExtractor:
    """Jitted CLIP vision features: `extractor(pixel_values NHWC, normalised)` -> dict of

    - `last_hidden_state` [B, 1+P, D]: `hidden_states[layer]` in transformers' sense (raw encoder output of that
      layer, before `post_layernorm`, CLS first). `layer` indexes the tuple of num_hidden_layers + 1 states:
      0 = `pre_layrnorm(embeddings)`, -1 = last layer (= transformers' `last_hidden_state`), -2 = penultimate
      layer's output (the input of the last layer); layers after the chosen one are not run.
    - `patch_features` [B, P, proj]: that state's patch tokens (CLS dropped) through `post_layernorm` and
      `visual_projection` (each switchable; proj = D without the projection).
    - `pooled_features` [B, P / pool^2, proj]: `patch_features` on the row-major patch grid, `pool` x `pool`
      average-pooled, flattened row-major.
    """

    def __init__(
        self,
        config: CLIPVisionSettings,
        params: Mapping,
        *,
        layer: int = -1,
        apply_post_layernorm: bool = True,
        apply_projection: bool = True,
        pool: int = 4,
        dtype: Any = jnp.float32,
        preprocessing: Mapping[str, Any] | None = None,
    ):
        hidden_state_index(layer, config.num_hidden_layers)  # validates `layer` now rather than at the first call
        self.config = config
        self.module = CLIPVisionTower(config, with_projection=apply_projection, dtype=dtype)
        self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        self.layer = layer
        self.apply_post_layernorm = apply_post_layernorm
        self.apply_projection = apply_projection
        self.pool = pool
        self.dtype = dtype
        self.preprocessing = dict(DEFAULT_PREPROCESSING if preprocessing is None else preprocessing)
        self._forward = jax.jit(self.features)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        layer: int = -1,
        apply_post_layernorm: bool = True,
        apply_projection: bool = True,
        pool: int = 4,
        dtype: Any = jnp.float32,
    ) -> "CLIPFeatureExtractor":
        """From a Hugging Face CLIP folder (or a hub id already in the local cache): `config.json` plus
        `model.safetensors`, `pytorch_model.bin` or `flax_model.msgpack`; `preprocessor_config.json` if present.

        Raises FileNotFoundError for a missing folder/config/weights and `CheckpointMismatchError` (naming the file
        and every unknown, missing or mis-shaped key) when the weights do not fit the config.
        """
        folder, config, params = load_vision_tower(path_or_hub_id, with_projection=apply_projection)
        return cls(
            config,
            params,
            layer=layer,
            apply_post_layernorm=apply_post_layernorm,
            apply_projection=apply_projection,
            pool=pool,
            dtype=dtype,
            preprocessing=preprocessing_settings(folder),
        )

    def features(self, params: Mapping, pixel_values: jax.Array) -> dict[str, jax.Array]:
        """The pure function behind `__call__`: params are an argument (jit them, do not bake them in)."""
        hidden, features = self.module.apply(
            {"params": params},
            pixel_values.astype(self.dtype),
            layer=self.layer,
            apply_post_layernorm=self.apply_post_layernorm,
            apply_projection=self.apply_projection,
        )
        return {
            "last_hidden_state": hidden,
            "patch_features": features,
            "pooled_features": pool_patches(features, self.pool),
        }

    def __call__(self, pixel_values: np.ndarray | jax.Array) -> dict[str, jax.Array]:
        shape = np.shape(pixel_values)
        if len(shape) != 4 or shape[-1] != self.config.num_channels:
            raise ValueError(f"expected NHWC pixel values with {self.config.num_channels} channels, got {shape}")
        return self._forward(self.params, jnp.asarray(pixel_values))

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """`preprocess` with this checkpoint's preprocessor settings."""
        return preprocess(images, **self.preprocessing)
