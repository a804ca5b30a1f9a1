"""DINOv2 tower: parity with transformers' PyTorch `Dinov2Model` (dinov2_tiny fixture, native and interpolated
positions), checkpoint key spellings, register tokens, errors, the antialiased resize against PIL, and FQGAN's
teacher preprocessing against torch's nearest-neighbour rule."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image
from safetensors.numpy import load_file, save_file

from conftest import relative_error
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.models import dinov2

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(fixtures_dir):
    return fixtures_dir / "dinov2_tiny" / "hf"


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    with np.load(fixtures_dir / "dinov2_tiny" / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return dinov2.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def state(hf_dir):
    return load_file(hf_dir / "model.safetensors")


@pytest.fixture(scope="module")
def config_dict(hf_dir):
    return json.loads((hf_dir / "config.json").read_text())


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def make_folder(path, config: dict, weights: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(path / "model.safetensors"))
    return path


# ------------------------------------------------------------------------------------------------ parity
def test_parity_with_transformers(loaded, reference):
    model, variables = loaded
    out = jax.jit(model.apply)(variables, nhwc(reference["pixel_values"]))
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key].shape == reference[key].shape, key
        assert relative_error(out[key], reference[key]) < TOL, key


def test_parity_other_size_interpolates_positions(loaded, reference):
    model, variables = loaded
    want = reference["last_hidden_state_other_size"]
    out = model.apply(variables, nhwc(reference["pixel_values_other_size"]))["last_hidden_state"]
    assert out.shape == want.shape == (1, 17, 32)
    assert relative_error(out, want) < TOL


def test_params_follow_checkpoint_names(loaded):
    paths = {"/".join(p) for p in traverse_util.flatten_dict(loaded[1]["params"])}
    assert "encoder/layer_1/layer_scale2/lambda1" in paths
    assert "encoder/layer_0/attention/out_proj/kernel" in paths
    assert "embeddings/patch_embeddings/projection/kernel" in paths
    assert not any("mask_token" in p for p in paths)


def test_transformers5_attention_names_are_accepted(tmp_path, state, config_dict, loaded, reference):
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    weights = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        weights[key] = value
    model, variables = dinov2.from_pretrained(make_folder(tmp_path, config_dict, weights))
    jax.tree.map(np.testing.assert_array_equal, variables, loaded[1])


# ------------------------------------------------------------------------------------------------ registers
def test_register_tokens_follow_the_cls_token(tmp_path, state, config_dict, reference):
    """`dinov2_with_registers`: R learned tokens after CLS (after the positions are added), antialiased position
    resizing. Zero registers that no token attends to would change nothing; here they are random."""
    config = {**config_dict, "model_type": "dinov2_with_registers", "num_register_tokens": 2}
    registers = np.random.default_rng(0).standard_normal((1, 2, 32)).astype(np.float32)
    model, variables = dinov2.from_pretrained(
        make_folder(tmp_path, config, {**state, "embeddings.register_tokens": registers}))
    assert model.config.num_register_tokens == 2 and model.config.antialias_positions
    emb = model.apply(variables, nhwc(reference["pixel_values"]), method=lambda m, x: m.embeddings(x))
    np.testing.assert_array_equal(emb[:, 1:3], np.broadcast_to(registers, (2, 2, 32)))
    plain_model, plain_variables = dinov2.from_pretrained(make_folder(tmp_path / "plain", config_dict, state))
    plain = plain_model.apply(plain_variables, nhwc(reference["pixel_values"]), method=lambda m, x: m.embeddings(x))
    np.testing.assert_allclose(emb[:, [0, 3, 4, 5, 6]], plain, rtol=1e-6, atol=1e-6)
    out = model.apply(variables, nhwc(reference["pixel_values_other_size"]))["last_hidden_state"]
    assert out.shape == (1, 19, 32)
    with pytest.raises(CheckpointMismatchError, match="missing.*embeddings/register_tokens"):
        dinov2.from_pretrained(make_folder(tmp_path / "no_registers", config, state))


@pytest.mark.parametrize("n_in, n_out", [(4, 9), (37, 16), (16, 16), (5, 2)])
def test_antialiased_resize_matches_pil_bicubic(n_in, n_out):
    """torch's antialiased bicubic is PIL's resampling filter: compare with PIL's 32-bit float resize."""
    grid = np.random.default_rng(n_in).standard_normal((n_in, n_in)).astype(np.float32)
    pil = np.asarray(Image.fromarray(grid, mode="F").resize((n_out, n_out), Image.BICUBIC))
    matrix = dinov2.antialiased_bicubic_resize_matrix(n_in, n_out)
    np.testing.assert_allclose(matrix @ grid @ matrix.T, pil, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_mismatched_weights_name_key_and_file(tmp_path, state, config_dict):
    weights = dict(state)
    del weights["encoder.layer.1.layer_scale2.lambda1"]
    weights["encoder.layer.0.norm1.weight"] = np.ones(16, np.float32)
    weights["encoder.layer.0.gamma"] = np.ones(32, np.float32)
    folder = make_folder(tmp_path, config_dict, weights)
    with pytest.raises(CheckpointMismatchError) as err:
        dinov2.from_pretrained(folder)
    message = str(err.value)
    assert str(folder / "model.safetensors") in message
    assert "encoder/layer_1/layer_scale2/lambda1" in message
    assert "encoder.layer.0.norm1.weight: (16,)" in message
    assert "encoder.layer.0.gamma" in message


def test_missing_or_wrong_folder(tmp_path, hf_dir, config_dict):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor"):
        dinov2.from_pretrained(tmp_path / "absent")
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        dinov2.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="none of the weight files model.safetensors"):
        dinov2.from_pretrained(make_folder(tmp_path / "no_weights", config_dict))
    make_folder(tmp_path / "clip", {"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="model_type 'clip_vision_model' is not one of"):
        dinov2.from_pretrained(tmp_path / "clip")


def test_bad_pixels_are_named(loaded):
    model, variables = loaded
    with pytest.raises(ValueError, match="3 channels"):
        model.apply(variables, np.zeros((1, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="10x28 pixels is smaller than one 14-pixel patch"):
        model.apply(variables, np.zeros((1, 10, 28, 3), np.float32))


# ------------------------------------------------------------------------------------------------ teacher input
def test_teacher_inputs_follow_torch_nearest():
    """torch's default `interpolate` picks source pixel floor(i * in / out): 448 -> 224 keeps the even pixels,
    112 -> 224 repeats each pixel twice, 256 -> 224 skips every 8th."""
    rng = np.random.default_rng(0)
    identity = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    big = rng.random((1, 448, 448, 3), np.float32)
    np.testing.assert_array_equal(dinov2.teacher_inputs(jnp.asarray(big), **identity), big[:, ::2, ::2])
    small = rng.random((1, 112, 112, 3), np.float32)
    np.testing.assert_array_equal(dinov2.teacher_inputs(jnp.asarray(small), **identity),
                                  small.repeat(2, axis=1).repeat(2, axis=2))
    np.testing.assert_array_equal(dinov2.nearest_indices(256, 224), np.arange(224) * 256 // 224)
    image = rng.random((2, 256, 200, 3), np.float32)
    out = np.asarray(dinov2.teacher_inputs(jnp.asarray(image)))
    assert out.shape == (2, 224, 224, 3)
    rows, cols = np.arange(224) * 256 // 224, np.arange(224) * 200 // 224
    want = (image[:, rows][:, :, cols] - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
