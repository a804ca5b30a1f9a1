"""NLayerDiscriminator: parity with taming's PatchGAN, checkpoint mapping errors, shapes and BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from vqlc_jax.convert.torch_layout import CheckpointMismatchError, map_state_dict, strip_prefix
from vqlc_jax.models.discriminator import NLayerDiscriminator

TINY = NLayerDiscriminator(n_layers=2, ndf=64)  # the fixture's (and the release's) configuration


@pytest.fixture(scope="module")
def disc_state_dict(official_tiny):
    return strip_prefix(official_tiny["state_dict"], "discriminator")


def _template(image_size: int = 32, batch: int = 2):
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(TINY.init, jax.random.key(0), x)


def test_parity_with_official_discriminator(official_tiny, disc_state_dict):
    # The fixture's `disc_logits` are the discriminator applied to `input` (the real image), not `reconstruction`.
    variables = map_state_dict(disc_state_dict, _template())
    logits = TINY.apply(variables, official_tiny["input"])
    assert logits.shape == official_tiny["disc_logits"].shape == (2, 6, 6, 1)
    assert relative_error(logits, official_tiny["disc_logits"]) <= 1e-4


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda sd: sd.pop("main.3.running_var"), "batch_stats/main_3/var"),
        (lambda sd: sd.__setitem__("main.9.weight", np.zeros((1, 256, 4, 4), np.float32)), "main.9.weight"),
        (lambda sd: sd.__setitem__("main.2.weight", np.zeros((128, 64, 3, 3), np.float32)), "main.2.weight"),
    ],
    ids=["missing", "unknown", "misshaped"],
)
def test_mismatched_state_dict_names_the_key(disc_state_dict, edit, named):
    state_dict = dict(disc_state_dict)
    edit(state_dict)
    with pytest.raises(CheckpointMismatchError, match=named):
        map_state_dict(state_dict, _template())


def test_release_shapes_at_256px():
    template = _template(256, batch=4)
    out = jax.eval_shape(TINY.apply, template, jax.ShapeDtypeStruct((4, 256, 256, 3), jnp.float32))
    assert out.shape == (4, 62, 62, 1)  # 256 -s2-> 128 -s2-> 64 -s1-> 63 -s1-> 62
    shapes = jax.tree.map(lambda a: a.shape, template)
    assert shapes["params"]["main_0"]["kernel"] == (4, 4, 3, 64)
    assert shapes["params"]["main_2"] == {"kernel": (4, 4, 64, 128)}  # no bias before BatchNorm
    assert shapes["params"]["main_5"] == {"kernel": (4, 4, 128, 256)}
    assert shapes["params"]["main_8"] == {"kernel": (4, 4, 256, 1), "bias": (1,)}
    assert shapes["batch_stats"]["main_6"] == {"mean": (256,), "var": (256,)}


def test_init_and_batchnorm_modes():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = TINY.init(jax.random.key(0), x)
    params = variables["params"]
    assert abs(float(jnp.std(params["main_5"]["kernel"])) - 0.02) < 2e-3
    assert abs(float(jnp.mean(params["main_6"]["scale"])) - 1.0) < 1e-2
    assert not jnp.any(params["main_6"]["bias"])

    eval_out, eval_updates = TINY.apply(variables, x, mutable=["batch_stats"])
    assert jax.tree.all(jax.tree.map(jnp.array_equal, eval_updates["batch_stats"], variables["batch_stats"]))

    train_out, updates = TINY.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    conv_out = updates["intermediates"]["main_2"]["__call__"][0]
    stats = updates["batch_stats"]["main_3"]  # torch momentum 0.1 from the initial mean 0, var 1
    np.testing.assert_allclose(stats["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4)
    assert not jnp.allclose(train_out, eval_out)
