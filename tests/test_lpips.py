"""LPIPS: parity with the official lpips/VQGAN-LC module, weight converters and the .npz round trip."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from vqlc_jax.convert import lpips_weights
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.models.lpips import LPIPS, Conv3x3

_APPLY = jax.jit(LPIPS().apply)


@pytest.fixture(scope="module")
def tiny(official_tiny):
    """The fixture's state dict with the VGG16 trunk rebuilt as its README says."""
    return {**official_tiny, "state_dict": {**official_tiny["state_dict"], **official_tiny["vgg_trunk"]}}


@pytest.fixture(scope="module")
def variables(tiny):
    return lpips_weights.lpips_from_vqgan_lc(tiny["state_dict"])


def test_parity_with_official_lpips(tiny, variables):
    got = np.asarray(_APPLY(variables, tiny["input"], tiny["reconstruction"]))
    assert got.shape == (2,)
    assert relative_error(got, tiny["lpips"]) <= 1e-4
    np.testing.assert_allclose(_APPLY(variables, tiny["input"], tiny["input"]), 0.0, atol=1e-7)


@pytest.mark.parametrize("height, width", [(1, 1), (2, 2), (2, 5), (4, 4)])
def test_conv3x3_equals_the_convolution(height, width):
    # Maps smaller than the kernel take the im2col path: same variables, value and gradients as nn.Conv.
    x = jax.random.normal(jax.random.key(0), (3, height, width, 5))
    variables = Conv3x3(7).init(jax.random.key(1), x)
    conv = nn.Conv(7, (3, 3), padding=((1, 1), (1, 1)))
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, conv.init(jax.random.key(1), x))

    def loss(apply, v, x):
        return jnp.sum(jnp.sin(apply(v, x)))

    ours = jax.value_and_grad(lambda v, x: loss(Conv3x3(7).apply, v, x), argnums=(0, 1))(variables, x)
    reference = jax.value_and_grad(lambda v, x: loss(conv.apply, v, x), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        assert relative_error(np.asarray(a), np.asarray(b)) <= 1e-5


def test_torchvision_and_heads_files_give_the_same_variables(tiny, variables):
    perceptual = {k.removeprefix("perceptual_loss."): v for k, v in tiny["state_dict"].items()}
    vgg = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in perceptual.items() if k.startswith("net.")}
    vgg["classifier.0.weight"] = np.zeros((4, 8), np.float32)  # torchvision's classifier is skipped
    heads = {k: v for k, v in perceptual.items() if k.startswith("lin")}
    converted = lpips_weights.lpips_from_torchvision(vgg, heads)
    assert jax.tree.all(jax.tree.map(np.array_equal, converted, variables))

    with pytest.raises(CheckpointMismatchError, match="features.3.weight"):  # a ReLU index holds no weights
        lpips_weights.lpips_from_torchvision({**vgg, "features.3.weight": np.zeros(3, np.float32)}, heads)


def test_scaling_layer_buffers_are_checked(tiny):
    bad = dict(tiny["state_dict"])
    bad["perceptual_loss.scaling_layer.scale"] = np.ones((1, 3, 1, 1), np.float32)
    with pytest.raises(CheckpointMismatchError, match="scaling_layer.scale"):
        lpips_weights.lpips_from_vqgan_lc(bad)


def test_npz_round_trip_and_errors(tmp_path, variables):
    path = tmp_path / "lpips_vgg.npz"
    lpips_weights.save_lpips_variables(variables, path)
    assert jax.tree.all(jax.tree.map(np.array_equal, lpips_weights.load_lpips_variables(path), variables))

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "params/lin2/model_1/kernel"}
    arrays["params/lin5/model_1/kernel"] = np.zeros((1, 1, 8, 1), np.float32)
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    with pytest.raises(CheckpointMismatchError, match=r"broken\.npz(.|\n)*lin5(.|\n)*params/lin2/model_1/kernel"):
        lpips_weights.load_lpips_variables(broken)


def test_vqgan_lc_file_reader(fixtures_dir):
    pytest.importorskip("vqlc_jax.convert.torch_file")
    path = fixtures_dir / "official_vqgan_lc" / "tiny_linear.pth"  # has the heads but, unlike releases, no trunk
    with pytest.raises(CheckpointMismatchError, match=r"tiny_linear\.pth(.|\n)*missing(.|\n)*params/net/slice1_0"):
        lpips_weights.lpips_from_vqgan_lc_file(path)
