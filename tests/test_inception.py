"""FID InceptionV3: pytorch-fid key names and shapes, parity with pytorch-fid on seeded random weights, the resize,
shapes at full size and the `.npz` round trip.

Fixture `data/pytorch_fid_inception_random.npz` (torch-free; regenerate with torch 2.13, torchvision 0.29 and
pytorch-fid 0.3.0 when the architecture changes):
- `state_dict_shapes`: JSON [[key, shape], ...] of `pytorch_fid.inception.fid_inception_v3().state_dict()`, in order.
- `features` [2, 2048]: `pytorch_fid.inception.InceptionV3([3]).eval()` (resize to 299 and 2x - 1 on) on
  `_images()` (NCHW), its weights loaded from `random_state_dict(state_dict_shapes)` below.
- `resize_input` [1, 13, 17, 3] (seed 2, uniform [0, 1)) and `resize_{h}x{w}`: torch
  `F.interpolate(mode='bilinear', align_corners=False)` of it (NHWC).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from vqlc_jax.convert import inception_weights
from vqlc_jax.convert.npz_variables import save_variables
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.metrics import Unavailable, load_fid_model
from vqlc_jax.models.inception import FEATURE_DIM, InceptionV3, resize_bilinear

FIXTURE = pathlib.Path(__file__).parent / "data" / "pytorch_fid_inception_random.npz"


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(FIXTURE) as data:
        out = {k: data[k] for k in data.files}
    out["state_dict_shapes"] = [(k, tuple(s)) for k, s in json.loads(str(out["state_dict_shapes"]))]
    return out


def random_state_dict(shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded stand-in for the FID weights, drawn in `shapes` order from one generator: conv weights He-normal,
    BatchNorm weight and running_var uniform [0.5, 1.5), the other float tensors 0.1 N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes:
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            out[key] = np.array(0)
        elif leaf == "weight" and len(shape) == 4:
            out[key] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / np.prod(shape[1:])))
        elif leaf in ("weight", "running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def _images() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (2, 40, 56, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def state_dict(reference) -> dict[str, np.ndarray]:
    return random_state_dict(reference["state_dict_shapes"])


@pytest.fixture(scope="module")
def variables(state_dict) -> dict:
    return inception_weights.inception_from_pytorch_fid(state_dict)


def test_parity_with_pytorch_fid(reference, variables):
    got = np.asarray(jax.jit(InceptionV3().apply)(variables, _images()))
    assert got.shape == (2, FEATURE_DIM)
    assert relative_error(got, reference["features"]) <= 1e-5  # measured 4.5e-7


def test_resize_matches_torch_bilinear(reference):
    for key in ("resize_29x7", "resize_5x40"):  # shrinking (no antialias) and mixed
        size = tuple(int(s) for s in key.removeprefix("resize_").split("x"))
        got = resize_bilinear(jnp.asarray(reference["resize_input"]), size)
        np.testing.assert_allclose(got, reference[key], atol=2e-6)


def test_converter_errors_name_the_keys(state_dict):
    bad = dict(state_dict)
    bad["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)  # a 1x7 conv, given 7x1
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    pattern = r"unknown(.|\n)*AuxLogits(.|\n)*missing(.|\n)*Mixed_7c/branch_pool/bn/var(.|\n)*branch7x7_2.conv.weight"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        inception_weights.inception_from_pytorch_fid(bad)


def test_full_size_shapes():
    x = jax.ShapeDtypeStruct((3, 256, 256, 3), jnp.float32)
    template = inception_weights.inception_template()
    assert jax.eval_shape(InceptionV3().apply, template, x).shape == (3, FEATURE_DIM)


def test_npz_round_trip_and_fid_model_loading(tmp_path, variables):
    path = tmp_path / "fid_inception.npz"
    save_variables(variables, path)
    model, loaded = load_fid_model(path)
    assert isinstance(model, InceptionV3)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables))

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "batch_stats/Mixed_5b/branch1x1/bn/mean"}
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    with pytest.raises(CheckpointMismatchError, match=r"broken\.npz(.|\n)*batch_stats/Mixed_5b/branch1x1/bn/mean"):
        load_fid_model(broken)


def test_fid_model_unavailable_without_weights(tmp_path):
    missing = tmp_path / inception_weights.PYTORCH_FID_FILE
    for path in (None, missing):
        result = load_fid_model(path)
        assert isinstance(result, Unavailable) and result.metric == "rFID"
    assert str(missing) in load_fid_model(missing).reason
