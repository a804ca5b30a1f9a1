"""LPIPS perceptual distance (VGG16 variant, lpips v0.1 as used by taming/VQGAN-LC) in Flax, NHWC.

Module names follow the torch ones, so `perceptual_loss.net.slice1.0.weight` maps to `params/net/slice1_0/kernel`
and `perceptual_loss.lin0.model.1.weight` to `params/lin0/model_1/kernel` mechanically (see
`convert.torch_layout`). The scaling layer's shift/scale are constants, not variables.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# lpips ScalingLayer constants (per RGB channel).
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)

# lpips `vgg16`: slice n holds torchvision `vgg16().features[i]` for the 3x3 convs i below (each followed by a
# ReLU); slices 2..5 start with the 2x2 max pool. Entries: (output channels, conv indices).
VGG16_SLICES: tuple[tuple[int, tuple[int, ...]], ...] = (
    (64, (0, 2)),
    (128, (5, 7)),
    (256, (10, 12, 14)),
    (512, (17, 19, 21)),
    (512, (24, 26, 28)),
)
NORMALIZE_EPS = 1e-10


class Conv3x3(nn.Module):
    """3x3 conv, stride 1, zero padding 1, with nn.Conv's variables (`kernel` HWIO, `bias`) and init.

    Maps smaller than the kernel (the last VGG slices at low resolution: 2x2 and 1x1 at 32 px) are computed as
    im2col + one matmul: the same sums, and XLA:CPU's convolution runs such maps orders of magnitude below its
    usual speed (see benchmarks/train_step.py). Larger maps use the convolution."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        height, width = x.shape[1:3]
        if min(height, width) >= 3:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            cols = jnp.concatenate([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], -1)
            y = cols @ kernel.reshape(9 * cin, self.features)
        return y + bias


class VGG16Features(nn.Module):
    """The VGG16 `features` trunk: [B, H, W, 3] -> relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 maps."""

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outputs = []
        for n, (channels, indices) in enumerate(VGG16_SLICES, start=1):
            if n > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i in indices:
                x = nn.relu(Conv3x3(channels, name=f"slice{n}_{i}")(x))
            outputs.append(x)
        return outputs


class NetLinLayer(nn.Module):
    """lpips `NetLinLayer` head: (eval-mode dropout, i.e. identity) then a 1x1 conv to 1 channel, no bias."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(1, (1, 1), use_bias=False, name="model_1")(x)


def normalize_tensor(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """Unit-normalises channel vectors as lpips does: x / (||x||_2 + eps) over the last axis."""
    return x / (jnp.sqrt(jnp.sum(x**2, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """Per-image LPIPS distance between two [B, H, W, 3] batches in [-1, 1] -> [B]."""

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        scaled = (jnp.concatenate([x0, x1]) - SHIFT) / SCALE
        feats = VGG16Features(name="net")(scaled)
        total = 0.0
        for k, f in enumerate(feats):
            f0, f1 = jnp.split(normalize_tensor(f), 2)
            total = total + jnp.mean(NetLinLayer(name=f"lin{k}")((f0 - f1) ** 2), axis=(1, 2, 3))
        return total
