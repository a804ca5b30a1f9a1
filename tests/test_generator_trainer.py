"""The generator trainer end to end (`configs/gpt_demo.py:smoke`, 8 fake CPU devices) on token maps that a tiny
tokenizer wrote with the encode job: training, sample grid, generation utilization, export and reload, preemption
and resume, NaN guard, vocabulary mismatch, multi-process agreement."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PROJECT_ROOT, StopAt, metrics_of_local_processes, override, read_metrics
from flax.traverse_util import flatten_dict

from vqlc_jax import Tokenizer
from vqlc_jax.generators import ar
from vqlc_jax.generators.encode import encode_dataset
from vqlc_jax.generators.generator import Generator
from vqlc_jax.train.generator import train_and_evaluate
from vqlc_jax.train.loop import NonFiniteLossError

sys.path.insert(0, str(PROJECT_ROOT))
from configs import gpt_demo  # noqa: E402
from configs.encode import demo as encode_demo  # noqa: E402

DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16, resolution=16,
                in_channels=3, out_ch=3, dropout=0.0, double_z=False)
NUM_CODES = 50


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> pathlib.Path:
    """48 bundled crops (and their mirror images) encoded by a random 16 px `vq` tokenizer into 8x8 token maps."""
    root = tmp_path_factory.mktemp("encoded")
    Tokenizer.create({"ddconfig": DDCONFIG, "embed_dim": 4, "quantizer": {"name": "vq", "num_codes": NUM_CODES}},
                     seed=0).save(root / "tokenizer")
    config = encode_demo.get_config()
    config.unlock()
    config.data.update(resolution=16, options={"resolution": 16}, max_images=48)
    config.encode.update(global_batch_size=16, images_per_shard=32)
    encode_dataset(config, root / "tokenizer", root / "data")
    return root / "data"


def smoke_config(encoded_dir, **overrides):
    return override(gpt_demo.get_config("smoke"), **{"data.encoded_dir": str(encoded_dir), **overrides})


@pytest.fixture(scope="module")
def uninterrupted(encoded, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpt")
    return workdir, train_and_evaluate(smoke_config(encoded), workdir)


def test_smoke_run_trains_samples_and_exports(uninterrupted):
    workdir, result = uninterrupted
    assert result["status"] == "done" and result["step"] == 6
    metrics = read_metrics(workdir)
    assert sorted(metrics) == [2, 4, 6]
    for m in metrics.values():
        # A fresh GPT predicts codes near-uniformly: the loss starts near log(vocabulary).
        assert np.isfinite(m["loss"]) and 0.5 * np.log(NUM_CODES) < m["loss"] < 2 * np.log(NUM_CODES + 3)
        assert m["grad_norm"] > 0 and m["lr"] > 0
    assert 0 < result["eval/gen_utilization"] <= 1 and result["eval/num_samples"] == 16
    assert (workdir / "samples_0000006.png").is_file()

    generator = Generator.load(workdir / "generator")
    labels = np.array([0, 1, 1, 0], np.int32)
    tokens = generator.sample(jax.random.key(0), labels)
    assert tokens.shape == (4, 8, 8) and tokens.min() >= 0 and tokens.max() < NUM_CODES
    np.testing.assert_array_equal(generator.sample(jax.random.key(0), labels), tokens)  # deterministic for a seed
    images = generator.generate(jax.random.key(0), labels)
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images).all()


def test_preempted_run_resumes_to_the_same_losses_and_weights(encoded, uninterrupted, tmp_path):
    reference = read_metrics(uninterrupted[0])
    first = train_and_evaluate(smoke_config(encoded), tmp_path, preemption=StopAt(3))
    assert first["status"] == "preempted"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
    assert train_and_evaluate(smoke_config(encoded), tmp_path)["status"] == "done"
    # Step 6 averages steps 5-6 in both runs: same data position, RNG, optimiser and EMA state after the restart.
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(read_metrics(tmp_path)[6][key], reference[6][key], rtol=1e-5, err_msg=key)
    final = [flatten_dict(Generator.load(w / "generator").params) for w in (uninterrupted[0], tmp_path)]
    for path in final[0]:
        np.testing.assert_allclose(final[1][path], final[0][path], rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(encoded, tmp_path, monkeypatch):
    train_and_evaluate(smoke_config(encoded), tmp_path, preemption=StopAt(3))
    real = ar.losses.chunked_softmax_cross_entropy
    monkeypatch.setattr(ar.losses, "chunked_softmax_cross_entropy", lambda *a, **k: real(*a, **k) * jnp.nan)
    with pytest.raises(NonFiniteLossError, match=r"step 4: non-finite loss .*loss=nan"):
        train_and_evaluate(smoke_config(encoded), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


@pytest.mark.parametrize("key, value, message", [
    ("model.num_codes", 999, f"config.model.num_codes=999 does not match the {NUM_CODES} "),
    ("model.num_classes", 3, "config.model.num_classes=3 does not match"),
    ("sample.cfg_scale", 2.0, None),
])
def test_config_that_does_not_fit_the_dataset_is_named(encoded, tmp_path, key, value, message):
    config = smoke_config(encoded, **{key: value})
    if message is None:  # guidance without the null class
        config.model.null_class, config.loss.class_dropout = False, 0.0
        message = "config.sample.cfg_scale=2.0"
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_two_processes_agree_with_one(encoded, tmp_path):
    """1 process x 4 devices and 2 processes x 2 devices give the same losses (local jax.distributed)."""
    results = metrics_of_local_processes(
        ["--config", "configs/gpt_demo.py:smoke", f"--config.data.encoded_dir={encoded}", "--config.total_steps=4",
         "--config.eval_every_steps=100", "--config.log_every_steps=4"], tmp_path, step=4)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(results[2][key], results[1][key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_generation_eval_job_reports_usage_and_inception_metrics(uninterrupted, tmp_path):
    """The job's mechanics with the random-weight Inception test file (its FID/IS numbers mean nothing)."""
    from configs.eval import gen_demo

    from vqlc_jax.convert import inception_weights
    from vqlc_jax.convert.npz_variables import save_variables
    from vqlc_jax.generators.evaluate import evaluate_generator, sample_batches
    from vqlc_jax.quantizers import code_counts, utilization

    rng = np.random.default_rng(0)
    template = inception_weights.inception_template(with_logits=True)
    variables = jax.tree_util.tree_map_with_path(  # BatchNorm variances 1, every other leaf small and random
        lambda path, s: np.ones(s.shape, np.float32) if path[-1].key == "var"
        else (0.05 * rng.standard_normal(s.shape)).astype(np.float32), template)
    save_variables(variables, tmp_path / "inception.npz")
    config = gen_demo.get_config()
    config.update(samples_per_class=2, batch_size=8, inception_path=str(tmp_path / "inception.npz"))
    config.reference_data.update(resolution=16, options={"resolution": 16}, max_images=16)
    generator = Generator.load(uninterrupted[0] / "generator")
    report = evaluate_generator(generator, config, tmp_path / "report", name="smoke")

    labels = np.repeat(np.arange(8), 2)
    tokens = np.concatenate([t for _, t in sample_batches(generator, np.random.default_rng(0).permutation(labels),
                                                          batch_size=8, seed=0)])
    assert report["num_samples"] == 16 and tokens.shape == (16, 8, 8)
    np.testing.assert_allclose(report["metrics"]["utilization"],
                               float(utilization(code_counts(tokens, NUM_CODES))), rtol=1e-6)
    for key in ("fid", "inception_score", "precision", "recall"):
        assert np.isfinite(report["metrics"][key]), key
    assert report["resize"] == "clean" and "bundled validation (16 images)" in report["fid_protocol"]
    assert (tmp_path / "report" / "gen_eval.md").is_file() and (tmp_path / "report" / "samples.png").is_file()


@pytest.mark.slow
def test_dit_trains_on_latents_samples_and_exports(encoded, tmp_path):
    """DiT on the same encoded dataset: normalised latents in, guided DDPM samples decoded through the codes."""
    from configs import dit_demo

    config = override(dit_demo.get_config("smoke"), **{"data.encoded_dir": str(encoded)})
    result = train_and_evaluate(config, tmp_path)
    assert result["status"] == "done"
    metrics = read_metrics(tmp_path)
    for m in metrics.values():
        assert np.isfinite(m["loss"]) and m["loss"] == pytest.approx(m["mse"] + m["vb"], rel=1e-4)
    assert 0 < result["eval/gen_utilization"] <= 1 and (tmp_path / "samples_0000004.png").is_file()

    generator = Generator.load(tmp_path / "generator")
    latents = generator.sample(jax.random.key(0), np.array([0, 3], np.int32))
    assert latents.shape == (2, 8, 8, 4) and np.isfinite(latents).all()
    assert generator.generate(jax.random.key(0), np.array([0, 3], np.int32)).shape == (2, 16, 16, 3)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sit", "ldm"])
def test_sit_and_ldm_train_on_latents_and_sample(encoded, tmp_path, family):
    import importlib

    demo = importlib.import_module(f"configs.{family}_demo")
    result = train_and_evaluate(override(demo.get_config("smoke"), **{"data.encoded_dir": str(encoded)}), tmp_path)
    assert result["status"] == "done" and np.isfinite(read_metrics(tmp_path)[4]["loss"])
    assert 0 < result["eval/gen_utilization"] <= 1
    latents = Generator.load(tmp_path / "generator").sample(jax.random.key(0), np.array([1, 2], np.int32))
    assert latents.shape == (2, 8, 8, 4) and np.isfinite(latents).all()


def test_guidance_interval_guides_only_at_the_chosen_noise_levels():
    from configs import dit_demo, sit_demo

    from vqlc_jax.generators.generator import DatasetInfo
    from vqlc_jax.generators.latent import DiTFamily, SiTFamily

    info = DatasetInfo(num_codes=NUM_CODES, num_classes=8, token_shape=(8, 8), latent_shape=(8, 8, 4),
                       latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4)
    # A stand-in model: 1 for the conditional rows, 0 for the null class; guided with scale 2 -> 0 + 2 (1 - 0) = 2.
    def apply(x, t, y):
        return jnp.where((y == 8)[:, None, None, None], 0.0, 1.0) * jnp.ones_like(x)

    x, labels = jnp.zeros((2, 8, 8, 4)), jnp.array([1, 2])
    for demo, family, inside, outside in ((dit_demo, DiTFamily, 100, 900), (sit_demo, SiTFamily, 0.9, 0.1)):
        config = demo.get_config("smoke")
        config.sample.update(cfg_scale=2.0, cfg_interval=(0.0, 0.5))
        model_fn = family(config, info).guided(apply, labels, config.sample, 4)
        np.testing.assert_allclose(model_fn(x, jnp.full((2,), inside)), 2.0)
        np.testing.assert_allclose(model_fn(x, jnp.full((2,), outside)), 1.0)
        config.sample.cfg_interval = (0.0, 1.0)
        np.testing.assert_allclose(family(config, info).guided(apply, labels, config.sample, 4)(
            x, jnp.full((2,), outside)), 2.0)
