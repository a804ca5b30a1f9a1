"""The encode job (tokens, latents, labels and flips of a split, on the shared shard writer) and the encoded-dataset
reader (deterministic, resumable, process-sharded batches)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import PROJECT_ROOT
from test_codebook_build import source_images

from vqlc_jax import Tokenizer
from vqlc_jax.data import make_source
from vqlc_jax.data.encoded import make_encoded_pipeline, open_encoded
from vqlc_jax.generators import encode

NUM_IMAGES = 40  # bundled train crops 0..39: 3 shards of 16, 16 and 8
NUM_CODES = 64
DDCONFIG = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8, resolution=32,
                in_channels=3, out_ch=3, dropout=0.0, double_z=False)  # 32 px -> 8x8 tokens, D' = 4


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "configs" / "encode" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(flip: bool = True):
    """The demo config on 40 bundled crops: batches of 8 over the 8 devices, shards of 16 images."""
    c = load_config("demo").unlock()
    c.data.max_images = NUM_IMAGES
    c.encode.update(flip=flip, global_batch_size=8, images_per_shard=16)
    return c


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A fresh tiny `lc` tokenizer at 32 px, saved."""
    codebook = np.random.default_rng(0).standard_normal((NUM_CODES, 12)).astype(np.float32)
    config = {"ddconfig": DDCONFIG, "embed_dim": 4,
              "quantizer": {"name": "lc", "num_codes": NUM_CODES, "codebook_dim": 12}}
    return Tokenizer.create(config, seed=0, codebook=codebook).save(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def encoded(tok_dir, tmp_path_factory):
    """The tiny config encoded once (8 devices, flips): (workdir, manifest)."""
    workdir = tmp_path_factory.mktemp("encoded")
    return workdir, encode.encode_dataset(tiny_config(), tok_dir, workdir)


@pytest.fixture(scope="module")
def dataset(encoded):
    return open_encoded(encoded[0])


def copy_of(encoded, tmp_path):
    shutil.copytree(encoded[0], tmp_path / "copy", copy_function=shutil.copy2)
    return tmp_path / "copy"


# ------------------------------------------------------------------------------------------------ the job
def test_encoding_equals_the_tokenizer(encoded, dataset, tok_dir):
    workdir, manifest = encoded
    tok = Tokenizer.load(tok_dir)
    images, labels = source_images(tiny_config())
    everything = np.arange(NUM_IMAGES)
    for suffix, view in (("", images), ("_flip", images[:, :, ::-1])):
        np.testing.assert_array_equal(dataset.read("tokens" + suffix, everything), tok.encode(view))
        _, _, aux = tok.reconstruct(view)
        latents = dataset.read("latents" + suffix, everything)
        assert latents.dtype == np.float16 and latents.shape == (NUM_IMAGES, 8, 8, 4)
        np.testing.assert_allclose(latents, np.asarray(aux["z"]), rtol=1e-3, atol=1e-3)  # float16
    np.testing.assert_array_equal(dataset.labels, labels)
    # Latent statistics: numpy over every written latent, flips included.
    written = np.concatenate([dataset.read(name, everything) for name in ("latents", "latents_flip")])
    written = written.astype(np.float64).reshape(-1, 4)
    np.testing.assert_allclose(dataset.latent_mean, written.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dataset.latent_std, written.std(axis=0), rtol=1e-12)
    assert [s["images"] for s in manifest["shards"]] == [16, 16, 8] and manifest["complete"]
    assert (dataset.num_images, dataset.token_shape, dataset.latent_shape) == (NUM_IMAGES, (8, 8), (8, 8, 4))
    num_classes = make_source("bundled", "train", {"resolution": 32}).num_classes
    assert (dataset.num_codes, dataset.num_classes, dataset.has_flips) == (NUM_CODES, num_classes, True)
    assert dataset.tokenizer_dir == str(tok_dir.absolute())
    info = dataset.tokenizer_config
    assert (info["embed_dim"], info["downsample"], info["resolution"], info["quantizer"]) == (4, 4, 32, "lc")
    assert sorted(p.name for p in workdir.iterdir())[:3] == ["labels-00000-of-00003.npy",
                                                             "labels-00001-of-00003.npy", "labels-00002-of-00003.npy"]
    assert len(list(workdir.iterdir())) == 3 * 5 + 1


def test_resume_redoes_only_the_damaged_shards(encoded, tok_dir, tmp_path):
    workdir = copy_of(encoded, tmp_path)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.glob("*.npy")}
    damaged = workdir / "latents-00001-of-00003.npy"
    data = bytearray(damaged.read_bytes())
    data[-8:] = bytes(8)  # same size, other content: only the sha256 tells
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(before[damaged.name][0],) * 2)
    (workdir / "tokens_flip-00002-of-00003.npy").unlink()
    (workdir / ".tokens-00000-of-00003.npy.123.tmp").write_bytes(b"partial")  # a write cut short
    manifest = encode.encode_dataset(tiny_config(), tok_dir, workdir)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.glob("*.npy")}
    redone = {name for name in before if after[name][0] != before[name][0]}
    assert redone == {f"{kind}-0000{s}-of-00003.npy" for s in (1, 2)
                      for kind in ("tokens", "latents", "labels", "tokens_flip", "latents_flip")}
    assert all(after[name][1] == before[name][1] for name in before)
    assert not list(workdir.glob(".*.tmp")) and manifest["latent_mean"] == encoded[1]["latent_mean"]


def test_another_run_into_the_folder_is_refused(encoded, tok_dir, tmp_path):
    workdir = copy_of(encoded, tmp_path)
    files = {p.name: p.read_bytes() for p in workdir.iterdir()}
    with pytest.raises(ValueError, match=r"written by another encoding.*'flip'"):
        encode.encode_dataset(tiny_config(flip=False), tok_dir, workdir)
    tok = Tokenizer.load(tok_dir)
    Tokenizer(tok.config, jax.tree.map(lambda v: v * 1.01, tok.variables)).save(tmp_path / "other")  # other weights
    with pytest.raises(ValueError, match=r"written by another encoding.*'tokenizer_digest'"):
        encode.encode_dataset(tiny_config(), tmp_path / "other", workdir)
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == files  # nothing overwritten


def test_a_tokenizer_of_another_resolution_is_refused(tok_dir, tmp_path):
    config = tiny_config()
    config.data.update(resolution=16, options={"resolution": 16})
    where = re.escape(str(tok_dir.absolute() / "tokenizer.json"))
    with pytest.raises(ValueError, match=rf"data.resolution=16 does not match .*resolution=32 in {where}"):
        encode.encode_dataset(config, tok_dir, tmp_path)
    config.data.update(resolution=30, options={"resolution": 30})
    with pytest.raises(ValueError, match=rf"data.resolution=30 is not divisible by .* factor 4 .* {where}"):
        encode.encode_dataset(config, tok_dir, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["demo", "imagenet_f16"])
def test_configs_are_valid_and_locked(name):
    config = load_config(name)
    encode.check_config(config)
    with pytest.raises(AttributeError, match="flips"):
        config.encode.flips = True
    assert config.encode.flip == (name == "demo")
    assert config.data.resolution == (32 if name == "demo" else 256)


def test_config_errors_name_the_key():
    config = tiny_config()
    config.encode.images_per_shard = 12
    with pytest.raises(ValueError, match=r"config.encode.images_per_shard=12: .*global_batch_size=8"):
        encode.check_config(config)


# ------------------------------------------------------------------------------------------------ the reader
def collect(dataset, **kwargs) -> list:
    return list(make_encoded_pipeline(dataset, **kwargs))


def test_reader_epochs_are_permutations_of_images_and_flips(dataset):
    kwargs = dict(global_batch_size=8, train=True, num_epochs=2, fields=("tokens", "latents", "label"))
    run = collect(dataset, seed=3, **kwargs)
    assert len(run) == 2 * 80 // 8 and [b.step for b in run] == list(range(20))
    assert [b.step for b in run if b.end_of_epoch] == [9, 19]
    for epoch in range(2):
        seen = np.concatenate([b.index + NUM_IMAGES * b.flipped for b in run if b.epoch == epoch])
        np.testing.assert_array_equal(np.sort(seen), np.arange(2 * NUM_IMAGES))  # every (image, flipped?) once
    assert not np.array_equal(run[0].index, run[10].index)  # reshuffled each epoch
    for batch in run[:4]:
        for j, (i, flipped) in enumerate(zip(batch.index, batch.flipped)):
            suffix = "_flip" if flipped else ""
            np.testing.assert_array_equal(batch.tokens[j], dataset.read("tokens" + suffix, [i])[0])
            np.testing.assert_array_equal(batch.latents[j], dataset.read("latents" + suffix, [i])[0])
        assert batch.tokens.dtype == np.int32 and batch.latents.dtype == np.float32
        np.testing.assert_array_equal(batch.label, dataset.labels[batch.index])
    for a, b in zip(run, collect(dataset, seed=3, **kwargs)):  # deterministic
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(collect(dataset, seed=4, **kwargs)[0].index, run[0].index)
    plain = collect(dataset, seed=3, global_batch_size=8, train=True, num_epochs=1, use_flips=False)
    assert len(plain) == 5 and not any(b.flipped.any() for b in plain) and plain[0].latents is None


def test_reader_resumes_at_any_step_and_splits_over_processes(dataset):
    kwargs = dict(global_batch_size=16, seed=11, train=True, num_epochs=3)
    full = collect(dataset, **kwargs)
    resumed = collect(dataset, start_step=7, **kwargs)  # mid-epoch (5 steps per epoch), crosses two boundaries
    assert len(resumed) == len(full) - 7
    halves = [collect(dataset, process_index=p, process_count=2, **kwargs) for p in range(2)]
    for step, batch in enumerate(full):
        if step >= 7:
            other = resumed[step - 7]
            assert (other.step, other.epoch, other.end_of_epoch) == (batch.step, batch.epoch, batch.end_of_epoch)
            np.testing.assert_array_equal(other.tokens, batch.tokens)
        for name in ("tokens", "label", "index", "flipped", "mask"):
            parts = [getattr(halves[p][step], name) for p in range(2)]
            assert len(parts[0]) == 8
            np.testing.assert_array_equal(np.concatenate(parts), getattr(batch, name))


def test_reader_evaluation_pass_covers_each_example_once(dataset):
    batches = collect(dataset, global_batch_size=24, seed=0, train=False)
    assert len(batches) == 4 and batches[-1].end_of_epoch  # 80 examples padded to 96
    seen = np.concatenate([b.index + NUM_IMAGES * b.flipped for b in batches])
    mask = np.concatenate([b.mask for b in batches])
    np.testing.assert_array_equal(seen[mask], np.arange(80))  # in order: the images, then their mirror images
    with pytest.raises(ValueError, match="fields=.*'pixels'"):
        make_encoded_pipeline(dataset, global_batch_size=8, seed=0, train=True, fields=("pixels",))


@pytest.mark.parametrize("value", [NUM_CODES, -1])
def test_out_of_range_tokens_name_the_shard(encoded, tmp_path, value):
    workdir = copy_of(encoded, tmp_path)
    shard = workdir / "tokens_flip-00001-of-00003.npy"
    tokens = np.load(shard)
    tokens[3, 2, 1] = value
    np.save(shard, tokens)  # same size: the reader's open check is what catches it
    with pytest.raises(ValueError, match=rf"token shard {re.escape(str(shard))} holds the index {value}, outside"):
        open_encoded(workdir)


def test_unfinished_or_missing_data_is_named(encoded, tmp_path):
    workdir = copy_of(encoded, tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "manifest.json"))):
        open_encoded(tmp_path)
    (workdir / "latents-00002-of-00003.npy").unlink()
    with pytest.raises(ValueError, match=r"encoded shard .*latents-00002-of-00003.npy is missing"):
        open_encoded(workdir)
    manifest = json.loads((workdir / "manifest.json").read_text())
    manifest.update(complete=False, shards=manifest["shards"][:2])
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unfinished \\(2 of 3 shards\\)"):
        open_encoded(workdir)
