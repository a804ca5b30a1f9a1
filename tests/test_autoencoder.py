"""Encoder/decoder architecture: the paper's f16 and f8 configs build with the right shapes (eval_shape only)."""

import jax
import jax.numpy as jnp
import pytest

from vqlc_jax.models.autoencoder import Decoder, Encoder
from vqlc_jax.models.vqgan import build_vqgan

F16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256, resolution=256)
F8 = dict(F16, ch_mult=(1, 2, 2, 4))


@pytest.mark.parametrize("ddconfig, grid, attn_levels", [(F16, 16, ["down_4"]), (F8, 32, [])])
def test_paper_configs_build_with_expected_shapes(ddconfig, grid, attn_levels):
    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    enc_vars = jax.eval_shape(Encoder(**ddconfig).init, jax.random.key(0), images)
    z = jax.eval_shape(Encoder(**ddconfig).apply, enc_vars, images)
    assert z.shape == (2, grid, grid, 256)
    dec = Decoder(**ddconfig)
    dec_vars = jax.eval_shape(dec.init, jax.random.key(0), z)
    out = jax.eval_shape(dec.apply, dec_vars, z)
    assert out.shape == (2, 256, 256, 3)
    # Attention sits at the level whose configured resolution is in attn_resolutions (16), plus the mid block.
    levels = enc_vars["params"]
    assert [k for k, v in levels.items() if k.startswith("down_") and "attn_0" in v] == attn_levels
    assert "attn_1" in levels["mid"]


def test_odd_sizes_keep_the_downsampling_factor():
    enc = Encoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=32)
    x = jax.ShapeDtypeStruct((1, 48, 64, 3), jnp.float32)
    v = jax.eval_shape(enc.init, jax.random.key(0), x)
    assert jax.eval_shape(enc.apply, v, x).shape == (1, 12, 16, 4)


def test_unknown_ddconfig_key_is_named():
    with pytest.raises(ValueError, match="ch_mul"):
        build_vqgan({"ddconfig": {"ch_mul": [1, 2]}, "embed_dim": 8, "quantizer": {"name": "vq", "num_codes": 4}})
