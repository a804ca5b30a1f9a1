"""InceptionV3 pool3 features for FID (and the 1008-way logits for the Inception Score), as pytorch-fid's
`InceptionV3(output_blocks=[3])` with its FID weights.

pytorch-fid builds torchvision's `Inception3(num_classes=1008, aux_logits=False)` and swaps in the blocks ported
from TensorFlow's 2015-12-05 graph: `FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1` average-pool their pool
branch with `count_include_pad=False` (TF `SAME` average pooling) and `FIDInceptionE_2` (`Mixed_7c`) max-pools it.
Every conv is torchvision's `BasicConv2d`: conv without bias, BatchNorm (eps 1e-3, eval mode: running statistics),
ReLU. Modules are named after the torch attributes, so `Mixed_5b.branch1x1.conv.weight` maps to
`params/Mixed_5b/branch1x1/conv/kernel` mechanically (`convert.inception_weights`). NHWC throughout; channel
concatenation keeps torch's branch order.

The Inception Score takes its logits as the original TF code did (improved-gan, ADM's evaluator, torch-fidelity's
`logits_unbiased`): pool3 times the 2048 x 1008 `fc` weights, without the bias.
"""

from __future__ import annotations

import concurrent.futures

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-3
INPUT_SIZE = 299
FEATURE_DIM = 2048
LOGITS_DIM = 1008

Pair = tuple[int, int]


def resize_clean(images: np.ndarray, size: Pair = (INPUT_SIZE, INPUT_SIZE)) -> np.ndarray:
    """clean-fid's resize (`make_resizer("PIL", False, "bicubic", size)`) on the host: uint8 [B, H, W, C] ->
    float32 [B, *size, C] on the 0..255 scale, each channel resized as a PIL float image (mode "F") with bicubic
    antialiasing, not clipped and not re-quantised."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"resize_clean: expected uint8 images [B, H, W, C], got {images.dtype} {images.shape}")

    def channel(plane: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(plane.astype(np.float32)).resize(size[::-1], Image.Resampling.BICUBIC))

    with concurrent.futures.ThreadPoolExecutor() as pool:  # PIL releases the GIL while resampling
        planes = pool.map(channel, (image[..., c] for image in images for c in range(images.shape[-1])))
        planes = np.array(list(planes), np.float32)  # [B * C, *size]
    return planes.reshape(len(images), images.shape[-1], *size).transpose(0, 2, 3, 1)


def resize_bilinear(images: jax.Array, size: Pair) -> jax.Array:
    """[B, H, W, C] -> [B, *size, C] like torch `F.interpolate(mode='bilinear', align_corners=False)`: half-pixel
    centres, edge clamping and no antialiasing (also when shrinking)."""
    return jax.image.resize(images, (images.shape[0], *size, images.shape[-1]), "bilinear", antialias=False)


class BasicConv2d(nn.Module):
    """torchvision `BasicConv2d`: conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel_size: Pair = (1, 1)
    strides: int = 1
    padding: Pair = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = tuple((p, p) for p in self.padding)
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=pad, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 / stride 1 / pad 1 average over the valid (unpadded) inputs only, as TF and the FID blocks do."""
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, strides: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (`pool_features` channels)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's, unpatched): stride-2 3x3 | 1x1-3x3-3x3/2 | 3x3/2 max pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches with `channels_7x7` inner channels; avgpool-1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's, unpatched): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | 3x3/2 max pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (`max_pool=False`: FIDInceptionE_1, average pool without padding) and Mixed_7c (`max_pool=True`:
    FIDInceptionE_2, 3x3 / stride 1 / pad 1 max pool) with split 1x3 / 3x1 branches."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = [BasicConv2d(384, **row, name="branch3x3_2a")(b3), BasicConv2d(384, **col, name="branch3x3_2b")(b3)]
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = [BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd), BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)]
        pooled = _max_pool_3x3(x, strides=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] (pytorch-fid's 2048-d FID features), or with
    `with_logits` (pool3 [B, 2048], logits [B, 1008]) for the Inception Score (bias-free `fc`, module doc).

    As pytorch-fid: bilinear resize to 299x299 (`resize_input`; turn off to feed images already resized another
    way, e.g. clean-fid's), then x -> 2x - 1. Any input size >= 75 works without the resize. On GPU / TPU, apply
    under `jax.default_matmul_precision("highest")` for float32 convolutions (TF32 / bfloat16 passes otherwise).
    """

    resize_input: bool = True
    with_logits: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        x = 2.0 * x - 1.0
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(channels_7x7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        if not self.with_logits:
            return pool
        return pool, nn.Dense(LOGITS_DIM, use_bias=False, name="fc")(pool)
