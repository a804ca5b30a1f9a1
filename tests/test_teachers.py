"""FQGAN's frozen teachers (`models.teachers`): the CLS feature of the CLIP and DINOv2 towers loaded from the
`clip_tiny` / `dinov2_tiny` Hugging Face folders against transformers' outputs, the release's input path ([-1, 1]
-> [0, 1] -> torch nearest resize -> mean/std) against numpy, the cut gradient, and the loading errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from vqlc_jax.codebook.clip import CLIP_MEAN, CLIP_STD
from vqlc_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from vqlc_jax.models.teachers import TEACHERS, load_teacher

TOL = 1e-5
FOLDERS = {"clip": "clip_tiny", "dinov2": "dinov2_tiny"}


def reference(fixtures_dir, name):
    with np.load(fixtures_dir / FOLDERS[name] / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def images_for(pixel_values_nchw, mean, std):
    """The [-1, 1] images whose teacher input (at their own size, so no resize) is `pixel_values`."""
    pixels = np.asarray(pixel_values_nchw, np.float64).transpose(0, 2, 3, 1)
    return ((pixels * np.asarray(std) + np.asarray(mean)) * 2 - 1).astype(np.float32)


@pytest.mark.parametrize("name, mean, std, want", [
    ("clip", CLIP_MEAN, CLIP_STD, lambda ref: ref["last_hidden_state"][:, 0]),  # hidden_states[-1], pre post-LN
    ("dinov2", IMAGENET_MEAN, IMAGENET_STD, lambda ref: ref["pooler_output"]),  # last_hidden_state[:, 0]
])
def test_cls_feature_matches_transformers(fixtures_dir, name, mean, std, want):
    ref = reference(fixtures_dir, name)
    images = images_for(ref["pixel_values"], mean, std)
    teacher, variables = load_teacher(name, fixtures_dir / FOLDERS[name] / "hf", size=images.shape[1])
    assert teacher.name == name and teacher.width == want(ref).shape[-1]
    got = jax.jit(teacher.features)(variables, jnp.asarray(images))
    assert relative_error(got, want(ref)) < TOL


def test_input_path_is_the_release_nearest_resize(fixtures_dir):
    """256 px images -> 224 as torch's default `F.interpolate`: source index floor(i * in / out), in float64 here."""
    teacher, _ = load_teacher("dinov2", fixtures_dir / "dinov2_tiny" / "hf")
    assert teacher.size == 224
    images = np.random.default_rng(0).uniform(-1, 1, (2, 256, 192, 3)).astype(np.float32)
    rows = np.floor(np.arange(224) * (256 / 224)).astype(int)
    cols = np.floor(np.arange(224) * (192 / 224)).astype(int)
    want = ((images[:, rows][:, :, cols] * 0.5 + 0.5) - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(teacher.pixels(jnp.asarray(images)), want, rtol=1e-6, atol=1e-6)


def test_teacher_is_frozen(fixtures_dir):
    teacher, variables = load_teacher("clip", fixtures_dir / "clip_tiny" / "hf", size=32)
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    grads = jax.grad(lambda v, x: jnp.sum(teacher.features(v, x) ** 2), argnums=(0, 1))(variables, images)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_loading_errors_name_the_folder_and_what_was_found(fixtures_dir, tmp_path):
    dino = fixtures_dir / "dinov2_tiny" / "hf"
    with pytest.raises(ValueError, match=r"teacher 'clip' from .*dinov2_tiny.*model_type 'dinov2' is not one of"):
        load_teacher("clip", dino)
    with pytest.raises(ValueError, match=r"teacher 'dinov2' from .*clip_tiny.*model_type 'clip_vision_model'"):
        load_teacher("dinov2", fixtures_dir / "clip_tiny" / "hf")
    with pytest.raises(FileNotFoundError, match=r"teacher 'dinov2' from .*no_such_folder"):
        load_teacher("dinov2", tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match=r"teacher 'clip' from .*has no config.json"):
        load_teacher("clip", tmp_path)
    with pytest.raises(FileNotFoundError, match="teacher 'clip': no folder given"):
        load_teacher("clip", "")
    with pytest.raises(ValueError, match="unknown teacher 'siglip'; choices: clip, dinov2"):
        load_teacher("siglip", dino)
    assert sorted(TEACHERS) == ["clip", "dinov2"]
