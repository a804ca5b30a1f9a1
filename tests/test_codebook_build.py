"""The codebook job: the pixels extractor, sharded resumable feature extraction (pixels and CLIP, 1 and 8 devices),
clustering into a codebook the quantizer reads, per-class order, and the configs."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
from conftest import PROJECT_ROOT
from PIL import Image

from vqlc_jax.codebook import build as build_lib
from vqlc_jax.codebook import extract
from vqlc_jax.codebook.clip import CLIP_MEAN, CLIP_STD, CLIPFeatureExtractor
from vqlc_jax.codebook.pixels import PixelPatchExtractor
from vqlc_jax.data import Subset, make_source
from vqlc_jax.data.transforms import decode_image, resize_crop, to_float
from vqlc_jax.quantizers import load_codebook

CONFIGS = PROJECT_ROOT / "configs" / "codebook"
NUM_IMAGES = 40  # bundled train crops 0..39: 3 shards of 16, 16 and 8


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(resolution: int = 16):
    """The demo config on 40 bundled crops at 16 px: 4x4-pixel patches, 2x2 pooled: 4 vectors of 48-d per image."""
    c = load_config("demo")
    c.data.update(options={"resolution": resolution}, resolution=resolution, max_images=NUM_IMAGES)
    c.extract.update(global_batch_size=8, images_per_shard=16)
    c.codebook.update(k=8)
    c.kmeans.update(batch_size=64, num_steps=8, steps_per_call=4, log_every=4)
    return c


def source_images(config) -> tuple[np.ndarray, np.ndarray]:
    """The eval pipeline's images [-1, 1] and labels of `config`'s data, computed directly."""
    d = config.data
    source = Subset(make_source(d.name, d.split, dict(d.options)), d.max_images)
    records = [source[i] for i in range(len(source))]
    images = np.stack([to_float(resize_crop(decode_image(r.image), d.resolution)) for r in records])
    return images, np.asarray([r.label for r in records])


def read_shards(workdir) -> tuple[np.ndarray, np.ndarray]:
    features, labels, _ = extract.open_features(workdir / extract.FEATURES_DIR)
    return features.read(np.arange(features.num_rows)), labels


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The tiny config extracted once (8 devices): (workdir, manifest)."""
    workdir = tmp_path_factory.mktemp("tiny")
    return workdir, extract.extract_features(tiny_config(), workdir)


# ------------------------------------------------------------------------------------------------ pixels
def test_pixel_patches_by_hand():
    y, x, c = np.meshgrid(np.arange(8), np.arange(8), np.arange(3), indexing="ij")
    image = (100 * c + 10 * y + x).astype(np.float32)[None]  # [1, 8, 8, 3]
    out = PixelPatchExtractor(patch_size=2, pool=2)(image)
    assert out["patch_features"].shape == (1, 16, 12) and out["pooled_features"].shape == (1, 4, 12)
    first = [0, 100, 200, 1, 101, 201, 10, 110, 210, 11, 111, 211]  # pixels (0,0) (0,1) (1,0) (1,1), RGB each
    scale = 12 ** -0.5  # vectors are divided by sqrt(p * p * C): their norm is the patch's RMS value

    def check(got, pixels):
        np.testing.assert_allclose(got, np.multiply(pixels, scale), rtol=1e-6)

    check(out["patch_features"][0, 0], first)
    check(out["patch_features"][0, 1], np.add(first, 2))  # the patch to its right
    check(out["patch_features"][0, 4], np.add(first, 20))  # the patch below
    # Pooled cell (i, j) averages patches (2i..2i+1, 2j..2j+1): 4i, 4j pixels down/right, plus 1 pixel on average.
    for cell, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        check(out["pooled_features"][0, cell], np.add(first, 11 + 40 * i + 4 * j))
    np.testing.assert_allclose(np.linalg.norm(PixelPatchExtractor(4, 1)(-np.ones((1, 8, 8, 3)))["patch_features"],
                                              axis=-1), 1.0, rtol=1e-6)
    raw = PixelPatchExtractor(patch_size=2, pool=2, rms_scale=False)(image)
    np.testing.assert_array_equal(raw["patch_features"][0, 0], first)
    with pytest.raises(ValueError, match="patch_size 3 does not divide the 8x8"):
        PixelPatchExtractor(patch_size=3, pool=1)(image)


# ------------------------------------------------------------------------------------------------ extraction
def test_extraction_matches_direct_computation(extracted):
    (workdir, manifest), config = extracted, tiny_config()
    images, labels = source_images(config)
    want = np.asarray(PixelPatchExtractor(4, 2)(images)["pooled_features"]).astype(np.float16)
    features, got_labels = read_shards(workdir)
    np.testing.assert_allclose(features, want.reshape(-1, 48), rtol=1e-3, atol=1e-6)  # float16, summation order
    np.testing.assert_array_equal(got_labels, np.repeat(labels, 4))
    assert manifest["complete"] and manifest["num_shards"] == 3
    assert [s["images"] for s in manifest["shards"]] == [16, 16, 8]
    assert [s["rows"] for s in manifest["shards"]] == [64, 64, 32]
    assert (manifest["dim"], manifest["vectors_per_image"], manifest["dtype"]) == (48, 4, "float16")
    assert manifest["total_rows"] == NUM_IMAGES * 4 and manifest["skipped"] == 0
    names = sorted(p.name for p in (workdir / extract.FEATURES_DIR).iterdir())
    assert names == ["features-00000-of-00003.npy", "features-00001-of-00003.npy", "features-00002-of-00003.npy",
                     "labels-00000-of-00003.npy", "labels-00001-of-00003.npy", "labels-00002-of-00003.npy",
                     "manifest.json"]


def test_one_device_equals_eight(extracted, tmp_path):
    workdir, _ = extracted
    config = tiny_config()
    config.extract.num_devices = 1
    extract.extract_features(config, tmp_path)
    (one, one_labels), (eight, eight_labels) = read_shards(tmp_path), read_shards(workdir)
    np.testing.assert_allclose(one, eight, rtol=1e-3, atol=1e-6)  # float32 means summed in another order
    np.testing.assert_array_equal(one_labels, eight_labels)


def test_resume_redoes_only_the_damaged_shard(tmp_path):
    config = tiny_config()
    extract.extract_features(config, tmp_path)
    directory = tmp_path / extract.FEATURES_DIR
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.glob("*.npy")}
    damaged = directory / "features-00001-of-00003.npy"
    data = bytearray(damaged.read_bytes())
    data[-8:] = bytes(8)  # same size, other content: only the sha256 tells
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(before[damaged.name][0],) * 2)
    (directory / ".features-00002-of-00003.npy.123.tmp").write_bytes(b"partial")  # a write cut short
    manifest = extract.extract_features(config, tmp_path)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.glob("*.npy")}
    redone = {name for name in before if after[name][0] != before[name][0]}
    assert redone == {"features-00001-of-00003.npy", "labels-00001-of-00003.npy"}
    assert all(after[name][1] == before[name][1] for name in before)
    assert not list(directory.glob(".*.tmp")) and manifest["complete"]
    config.extractor.pool = 1  # other features into the same folder: refused
    with pytest.raises(ValueError, match=r"written by another extraction.*'extractor'"):
        extract.extract_features(config, tmp_path)


def test_resume_after_a_crash(tmp_path, monkeypatch, extracted):
    write = extract._write_shard

    def crash_at_last_shard(directory, index, *args):
        if index == 2:
            raise KeyboardInterrupt("preempted")
        return write(directory, index, *args)

    monkeypatch.setattr(extract, "_write_shard", crash_at_last_shard)
    with pytest.raises(KeyboardInterrupt):
        extract.extract_features(tiny_config(), tmp_path)
    partial = extract.read_manifest(tmp_path / extract.FEATURES_DIR)
    assert not partial["complete"] and [s["index"] for s in partial["shards"]] == [0, 1]
    with pytest.raises(ValueError, match="unfinished"):
        extract.open_features(tmp_path / extract.FEATURES_DIR)
    monkeypatch.setattr(extract, "_write_shard", write)
    extract.extract_features(tiny_config(), tmp_path)
    for resumed, whole in zip(read_shards(tmp_path), read_shards(extracted[0])):
        np.testing.assert_array_equal(resumed, whole)


def test_unreadable_images_are_counted_not_written(tmp_path):
    """A folder source (classes = sorted folder names) with a corrupt file: left out of the rows, counted."""
    rng = np.random.default_rng(0)
    colours = {"a_red": (200, 30, 30), "b_green": (30, 200, 30), "c_blue": (30, 30, 200)}
    for name, colour in colours.items():
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(np.asarray(colour) + rng.normal(0, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / name / f"{i}.png")
    (tmp_path / "data" / "train" / "b_green" / "2.png").write_bytes(b"not a png")
    config = tiny_config()
    with config.unlocked():  # other source options
        config.data.options = {"root": str(tmp_path / "data")}
    config.data.update(name="folder", max_images=0)
    config.extract.images_per_shard = 8
    config.codebook.update(mode="per_class", k=2)
    config.kmeans.batch_size = 8
    result = build_lib.build(config, tmp_path / "run")
    manifest = extract.read_manifest(tmp_path / "run" / extract.FEATURES_DIR)
    assert [(s["images"], s["skipped"], s["rows"]) for s in manifest["shards"]] == [(8, 1, 28), (7, 0, 28)]
    assert (manifest["skipped"], manifest["total_images"], manifest["total_rows"]) == (1, 14, 56)
    _, labels = read_shards(tmp_path / "run")
    np.testing.assert_array_equal(labels, np.repeat([0] * 5 + [1] * 4 + [2] * 5, 4))
    # Per class: rows [2c, 2c + 2) are class c's centres, classes in sorted order.
    codebook = load_codebook(tmp_path / "run" / "codebook.npy", expected_dim=48)
    assert codebook.shape == (6, 48) and result["classes"] == [0, 1, 2]
    means = np.asarray([(np.asarray(c) / 127.5 - 1) for c in colours.values()])  # [-1, 1] colour of each class
    centre_rgb = codebook.reshape(6, 16, 3).mean(axis=1)
    nearest = np.argmin(((centre_rgb[:, None] - means[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, [0, 0, 1, 1, 2, 2])


# ------------------------------------------------------------------------------------------------ CLIP
def test_clip_features_equal_the_extractor(fixtures_dir, tmp_path):
    """The tiny CLIP (32 px, patch 4: an 8x8 grid, pooled 2x2 -> 16 vectors of 16-d) on 1 and 8 devices."""
    hf = fixtures_dir / "clip_tiny" / "hf"
    config = tiny_config(resolution=32)
    config.extractor.update(name="clip", checkpoint=str(hf), pool=2)
    config.extract.feature_dtype = "float32"
    images, _ = source_images(config)
    clip = CLIPFeatureExtractor.from_pretrained(hf, pool=2)
    want = np.asarray(clip(((images + 1) / 2 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD))["pooled_features"])
    for devices in (1, 8):
        config.extract.num_devices = devices
        manifest = extract.extract_features(config, tmp_path / str(devices))
        features, _ = read_shards(tmp_path / str(devices))
        np.testing.assert_allclose(features, want.reshape(-1, 16), rtol=1e-5, atol=1e-5)
    assert manifest["extractor"]["checkpoint"] == str(hf.absolute()) and manifest["vectors_per_image"] == 16


def test_missing_clip_checkpoint_is_an_error_naming_it(tmp_path):
    config = tiny_config()
    config.extractor.update(name="clip", checkpoint=str(tmp_path / "no_such_clip"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no_such_clip"))):
        extract.extract_features(config, tmp_path)
    config.extractor.checkpoint = ""
    with pytest.raises(ValueError, match="extractor.checkpoint=''"):
        extract.extract_features(config, tmp_path)
    config.extractor.update(name="pixels", checkpoint="/some/clip")
    with pytest.raises(ValueError, match="pixels extractor uses no weights"):
        extract.extract_features(config, tmp_path)


# ------------------------------------------------------------------------------------------------ clustering
def test_build_writes_a_codebook_the_quantizer_reads(extracted):
    (workdir, _), config = extracted, tiny_config()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_lib.build(config, workdir / "elsewhere", stage="cluster")
    metadata = build_lib.build(config, workdir, stage="cluster")
    codebook = load_codebook(workdir / "codebook.npy", expected_dim=48)
    assert codebook.shape == (8, 48)
    info = json.loads((workdir / "codebook.json").read_text())
    assert (info["mode"], info["k"], info["steps"], info["num_codes"], info["dim"]) == ("global", 8, 8, 8, 48)
    assert info["extractor"]["name"] == "pixels" and info["dataset"]["name"] == "bundled" and info["pooling"] == 2
    assert info["features"]["total_rows"] == NUM_IMAGES * 4 and info["mean_inertia"] > 0
    assert metadata["method"] == "kmeans"
    # Clustering again resumes from the finished k-means checkpoint: the same codebook.
    build_lib.build(config, workdir, stage="cluster")
    np.testing.assert_array_equal(load_codebook(workdir / "codebook.npy"), codebook)


@pytest.mark.parametrize("method", ["random", "random_selection"])
def test_codebook_init_alternatives(extracted, tmp_path, method):
    (workdir, _), config = extracted, tiny_config()
    os.symlink(workdir / extract.FEATURES_DIR, tmp_path / extract.FEATURES_DIR)
    config.codebook.method = method
    build_lib.build(config, tmp_path, stage="cluster")
    codebook = load_codebook(tmp_path / "codebook.npy", expected_dim=48)
    assert codebook.shape == (8, 48)
    if method == "random_selection":  # distinct feature rows
        features, _ = read_shards(workdir)
        assert all((features == row).all(axis=1).any() for row in codebook.astype(np.float16))
        assert len(np.unique(codebook, axis=0)) == 8


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name, arg", [("demo", None), ("imagenet_clip_vitl14", None),
                                       ("imagenet_clip_vitl14", "global"), ("ffhq_clip_vitl14", None)])
def test_configs_are_valid_and_locked(name, arg):
    config = load_config(name, arg)
    build_lib.validate(config)
    with pytest.raises(AttributeError, match="batchsize"):
        config.kmeans.batchsize = 1
    if name != "demo":
        assert config.extractor.name == "clip" and config.extractor.pool == 4 and config.data.resolution == 224
        assert config.codebook.k == (100_000 if arg == "global" or name.startswith("ffhq") else 100)


def test_config_errors_name_the_key():
    config = tiny_config()
    config.extract.images_per_shard = 12
    with pytest.raises(ValueError, match=r"config.extract.images_per_shard=12: .*global_batch_size=8"):
        build_lib.validate(config)
    config = tiny_config()
    config.codebook.update(mode="per_class", method="random")
    with pytest.raises(ValueError, match="codebook.mode='per_class'"):
        build_lib.validate(config)
    config = load_config("imagenet_clip_vitl14", None).unlock()
    config.extractor.update(checkpoint="/clip/folder", rms_scale=False)
    with pytest.raises(ValueError, match="extractor.rms_scale=False: only the pixels extractor"):
        build_lib.validate(config)
    with pytest.raises(ValueError, match="unknown stage 'fit'"):
        build_lib.build(tiny_config(), "/nonexistent", stage="fit")
