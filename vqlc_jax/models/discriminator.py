"""Taming's PatchGAN discriminator (`NLayerDiscriminator` with BatchNorm) in Flax, NHWC.

Submodules are named after the torch `main` Sequential indices (`main_0`, `main_2`, `main_3`, ...), so the official
`discriminator.main.*` keys map with `convert.torch_layout.default_path` once the prefix is stripped.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_KERNEL = 4
_PAD = ((1, 1), (1, 1))  # torch padding=1 (symmetric), not 'SAME'


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """torch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); taming's weights_init leaves it."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: [B, H, W, input_nc] images -> [B, H', W', 1] patch logits.

    BatchNorm runs on batch statistics and updates `batch_stats` when `train`, else uses the running averages.
    Under a global-view `jit` the batch statistics already span the whole (sharded) batch, so no `axis_name`.
    Running variances are updated with the biased batch variance (torch uses the unbiased one; the factor n/(n-1)
    is negligible for n = B*H'*W').
    """

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # torch Sequential: 0 conv, 1 LReLU; block n (1..n_layers): 3n-1 conv, 3n BN, 3n+1 LReLU; last conv.
        def conv(h: jax.Array, index: int, features: int, stride: int, use_bias: bool) -> jax.Array:
            return nn.Conv(
                features,
                (_KERNEL, _KERNEL),
                strides=stride,
                padding=_PAD,
                use_bias=use_bias,
                kernel_init=nn.initializers.normal(0.02),
                bias_init=_torch_bias_init(h.shape[-1] * _KERNEL * _KERNEL),
                name=f"main_{index}",
            )(h)

        def norm(h: jax.Array, index: int) -> jax.Array:
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,  # torch momentum 0.1
                epsilon=1e-5,
                scale_init=lambda key, shape, dtype=jnp.float32: 1.0 + 0.02 * jax.random.normal(key, shape, dtype),
                name=f"main_{index}",
            )(h)

        x = nn.leaky_relu(conv(x, 0, self.ndf, 2, True), 0.2)
        for n in range(1, self.n_layers + 1):
            x = conv(x, 3 * n - 1, self.ndf * min(2**n, 8), 2 if n < self.n_layers else 1, False)
            x = nn.leaky_relu(norm(x, 3 * n), 0.2)
        return conv(x, 3 * self.n_layers + 2, 1, 1, True)
