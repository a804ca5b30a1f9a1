"""CLIP vision tower and feature extractor: parity with transformers' PyTorch CLIP (clip_tiny fixture), checkpoint
formats and errors, layer selection, position-embedding interpolation, and preprocessing parity with
transformers' CLIPImageProcessor."""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil

import numpy as np
import pytest
from flax import serialization, traverse_util
from safetensors.numpy import load_file, save_file

from vqlc_jax.codebook.clip import (
    CLIP_STD,
    CLIPFeatureExtractor,
    pool_patches,
    preprocess,
)
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.models.clip import CLIPVisionSettings, bicubic_resize_matrix

OUTPUTS = ("last_hidden_state", "patch_features", "pooled_features")
TOL = 1e-5


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def hf_dir(fixtures_dir):
    return fixtures_dir / "clip_tiny" / "hf"


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    ref = dict(np.load(fixtures_dir / "clip_tiny" / "reference.npz"))
    ref["pixels_nhwc"] = ref["pixel_values"].transpose(0, 2, 3, 1)
    return ref


@pytest.fixture(scope="module")
def extractor(hf_dir):
    return CLIPFeatureExtractor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def state(hf_dir):
    return load_file(hf_dir / "model.safetensors")


@pytest.fixture(scope="module")
def config_dict(hf_dir):
    return json.loads((hf_dir / "config.json").read_text())


def make_folder(path, config: dict, weights: dict | None = None, weight_name: str = "model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(path / weight_name))
    return path


def assert_parity(extractor, reference):
    out = extractor(reference["pixels_nhwc"])
    for key in OUTPUTS:
        assert out[key].shape == reference[key].shape, key
        assert rel_err(out[key], reference[key]) < TOL, key


# ------------------------------------------------------------------------------------------------ parity
def test_parity_with_transformers(extractor, reference):
    assert_parity(extractor, reference)


def test_full_clip_model_checkpoint(tmp_path, state, config_dict, reference):
    """`CLIPModel` layout: text tower, logit_scale and position_ids buffers are skipped; projection_dim comes
    from the top level, not from vision_config (whose default, 512, would not fit)."""
    vision = {k: v for k, v in config_dict.items() if k not in ("architectures", "model_type", "projection_dim")}
    config = {"model_type": "clip", "projection_dim": 16, "vision_config": vision, "text_config": {}}
    weights = {
        **state,
        "vision_model.embeddings.position_ids": np.arange(65)[None],
        "text_model.final_layer_norm.weight": np.ones(512, np.float32),
        "text_projection.weight": np.zeros((16, 512), np.float32),
        "logit_scale": np.zeros((), np.float32),
    }
    assert_parity(CLIPFeatureExtractor.from_pretrained(make_folder(tmp_path, config, weights)), reference)


def old_flax_clip_tree(state: dict) -> dict:
    """The params tree transformers' FlaxCLIPVisionModel saved (`flax_model.msgpack`): layers named '0', '1', ...
    under `encoder/layers`, Flax layouts, `nn.Embed` position table."""
    flat = {}
    for key, value in state.items():
        parts = key.split(".")
        leaf = parts[-1]
        if parts[-2:] == ["position_embedding", "weight"]:
            leaf = "embedding"
        elif leaf == "weight":
            leaf = {4: "kernel", 2: "kernel", 1: "scale"}[value.ndim]
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T if value.ndim == 2 else value
        flat[(*parts[:-1], leaf)] = value
    return traverse_util.unflatten_dict(flat)


def test_flax_msgpack_checkpoint(tmp_path, state, config_dict, reference):
    folder = make_folder(tmp_path, config_dict)
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(old_flax_clip_tree(state)))
    assert_parity(CLIPFeatureExtractor.from_pretrained(folder), reference)


def test_pytorch_bin_checkpoint(tmp_path, state, config_dict, reference):
    writer = pytest.importorskip("test_torch_file")  # its torch-free `torch.save` stand-in
    folder = make_folder(tmp_path, config_dict)
    writer.save(collections.OrderedDict((k, writer.tensor(v)) for k, v in state.items()), folder / "pytorch_model.bin")
    assert_parity(CLIPFeatureExtractor.from_pretrained(folder), reference)


def test_flat_vision_model_without_projection(tmp_path, state, config_dict, reference):
    """transformers 5's flat `CLIPVisionModel` keys (no `vision_model.` prefix, no projection)."""
    weights = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    folder = make_folder(tmp_path, config_dict, weights)
    ex = CLIPFeatureExtractor.from_pretrained(folder, apply_projection=False)
    out = ex(reference["pixels_nhwc"])
    assert rel_err(out["last_hidden_state"], reference["last_hidden_state"]) < TOL
    assert out["patch_features"].shape == (3, 64, 64)
    with pytest.raises(CheckpointMismatchError, match="missing.*visual_projection/kernel"):
        CLIPFeatureExtractor.from_pretrained(folder)


def test_switches_and_pooling(hf_dir, extractor, reference):
    x = reference["pixels_nhwc"]
    raw = CLIPFeatureExtractor.from_pretrained(hf_dir, apply_post_layernorm=False, apply_projection=False, pool=2)
    out = raw(x)
    np.testing.assert_allclose(out["patch_features"], out["last_hidden_state"][:, 1:], rtol=0, atol=0)
    manual = np.asarray(out["patch_features"]).reshape(3, 4, 2, 4, 2, 64).mean(axis=(2, 4)).reshape(3, 16, 64)
    np.testing.assert_allclose(out["pooled_features"], manual, rtol=1e-6, atol=1e-6)
    normed = CLIPFeatureExtractor.from_pretrained(hf_dir, apply_projection=False)(x)["patch_features"]
    assert normed.shape == (3, 64, 64) and np.abs(np.asarray(normed) - out["patch_features"]).max() > 1e-2
    with pytest.raises(ValueError, match="pool 3 does not divide the 8x8"):
        pool_patches(extractor(x)["patch_features"], 3)


# ------------------------------------------------------------------------------------------------ layers
def test_layer_selection_follows_hidden_states(hf_dir, extractor, reference):
    """layer=k is transformers' `hidden_states[k]` (num_hidden_layers + 1 entries, 0 = pre_layrnorm(embeddings)):
    -1 is last_hidden_state, -2 the penultimate layer's output, i.e. the last_hidden_state of the same model cut
    to num_hidden_layers - 1 layers."""
    x = reference["pixels_nhwc"]
    out = CLIPFeatureExtractor.from_pretrained(hf_dir, layer=-2)(x)
    assert rel_err(out["last_hidden_state"], reference["last_hidden_state"]) > 1e-2
    same = CLIPFeatureExtractor(extractor.config, extractor.params, layer=1)(x)
    np.testing.assert_array_equal(out["last_hidden_state"], same["last_hidden_state"])

    cut_config = dataclasses.replace(extractor.config, num_hidden_layers=1)
    cut_params = traverse_util.flatten_dict(dict(extractor.params))
    cut_params = traverse_util.unflatten_dict({k: v for k, v in cut_params.items() if "layers_1" not in k})
    cut = CLIPFeatureExtractor(cut_config, cut_params)(x)
    for key in OUTPUTS:
        assert rel_err(out[key], cut[key]) < 1e-6, key
    with pytest.raises(ValueError, match="layer 3 out of range for 2 encoder layers"):
        CLIPFeatureExtractor(extractor.config, extractor.params, layer=3)


# ------------------------------------------------------------------------------------------------ input sizes
@pytest.mark.parametrize("shape", [(1, 32, 48, 3), (1, 30, 30, 3)])
def test_bad_input_size_is_named(extractor, shape):
    with pytest.raises(ValueError, match=f"input size {shape[1]}x{shape[2]}"):
        extractor(np.zeros(shape, np.float32))


def test_other_square_sizes_interpolate_positions(extractor, reference):
    out = extractor(np.zeros((2, 48, 48, 3), np.float32))
    assert out["last_hidden_state"].shape == (2, 145, 64)
    assert out["pooled_features"].shape == (2, 9, 16)
    assert np.isfinite(np.asarray(out["pooled_features"])).all()


def test_bicubic_matches_torch_formula():
    np.testing.assert_array_equal(bicubic_resize_matrix(8, 8), np.eye(8, dtype=np.float32))
    for n_in, n_out in ((16, 24), (16, 9)):
        np.testing.assert_allclose(bicubic_resize_matrix(n_in, n_out).sum(axis=1), 1.0, atol=1e-6)
    # torch F.interpolate([0, 1], size=4, mode="bicubic", align_corners=False), from its Keys a=-0.75 weights
    # (source x = (i + 0.5) / 2 - 0.5, edge-clamped taps): -135/1280, 290/1280, 990/1280, 1415/1280.
    np.testing.assert_allclose(
        bicubic_resize_matrix(2, 4) @ np.array([0.0, 1.0]), [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-7
    )


# ------------------------------------------------------------------------------------------------ errors
def test_mismatched_weights_name_key_and_file(tmp_path, state, config_dict):
    weights = dict(state)
    del weights["vision_model.encoder.layers.1.mlp.fc2.bias"]
    weights["vision_model.post_layernorm.weight"] = np.ones(32, np.float32)
    folder = make_folder(tmp_path, config_dict, weights)
    with pytest.raises(CheckpointMismatchError) as err:
        CLIPFeatureExtractor.from_pretrained(folder)
    message = str(err.value)
    assert str(folder / "model.safetensors") in message
    assert "vision_model/encoder/layers_1/mlp/fc2/bias" in message
    assert "vision_model.post_layernorm.weight: (32,)" in message


def test_missing_config_or_weights(tmp_path, hf_dir, config_dict):
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        CLIPFeatureExtractor.from_pretrained(tmp_path)
    folder = make_folder(tmp_path / "no_weights", config_dict)
    with pytest.raises(FileNotFoundError, match="none of the weight files model.safetensors"):
        CLIPFeatureExtractor.from_pretrained(folder)
    make_folder(tmp_path / "not_clip", {"model_type": "vit"})
    with pytest.raises(ValueError, match="model_type 'vit'"):
        CLIPFeatureExtractor.from_pretrained(tmp_path / "not_clip")


def test_hub_id_only_from_local_cache(tmp_path, monkeypatch, hf_dir, reference):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'openai/clip-vit-large-patch14' is neither a local folder nor"):
        CLIPFeatureExtractor.from_pretrained("openai/clip-vit-large-patch14")
    repo = tmp_path / "models--tiny--clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(hf_dir, repo / "snapshots" / ("0" * 40))
    assert_parity(CLIPFeatureExtractor.from_pretrained("tiny/clip"), reference)


# ------------------------------------------------------------------------------------------------ preprocessing
def test_preprocess_matches_transformers_clip_image_processor():
    from skimage import data
    from transformers import CLIPImageProcessorPil  # the CLIPImageProcessor transformers uses without torchvision

    image = data.chelsea()  # 300 x 451: shortest-edge resize to 224 x 336, then the centre crop
    expected = CLIPImageProcessorPil()(images=image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess(image[None])
    assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-5  # measured: 0 (same PIL bicubic, same float ops)
    assert np.abs(preprocess([image])[0] - expected[0]).max() <= 1e-5


def test_preprocess_float_input_close_to_uint8():
    from skimage import data

    image = data.astronaut()
    grey_levels = np.abs(preprocess([image / 255.0]) - preprocess([image])) * np.asarray(CLIP_STD) * 255
    assert grey_levels.mean() < 0.5 and grey_levels.max() < 6  # measured: 0.25 mean, 5.0 max (sharp edges)


def test_preprocessor_config_is_used(tmp_path, hf_dir):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_dir, folder)
    settings = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3,
                "image_std": [0.25] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    ex = CLIPFeatureExtractor.from_pretrained(folder)
    image = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    pixels = ex.preprocess([image])
    np.testing.assert_array_equal(pixels, preprocess([image], 40, [0.5] * 3, [0.25] * 3, crop_size=32))
    assert ex(pixels)["pooled_features"].shape == (1, 4, 16)


def test_settings_from_transformers_config(config_dict):
    from transformers import CLIPConfig, CLIPVisionConfig

    settings = CLIPVisionSettings.from_hf(CLIPVisionConfig(**config_dict))
    assert settings == CLIPVisionSettings.from_hf(config_dict)
    full = CLIPConfig(vision_config=config_dict, projection_dim=32)
    assert CLIPVisionSettings.from_hf(full) == dataclasses.replace(settings, projection_dim=32)
