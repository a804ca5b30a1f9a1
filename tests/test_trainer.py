"""The trainer end to end on the bundled photos (`configs/demo.py:smoke`, 8 fake CPU devices): training, GAN
switch-on, evaluation, export, preemption and resume, NaN guard, config errors, multi-process agreement."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from conftest import PROJECT_ROOT, StopAt, metrics_of_local_processes, override, read_metrics

from vqlc_jax import Tokenizer
from vqlc_jax.train import config as config_lib
from vqlc_jax.train import steps as steps_lib
from vqlc_jax.train.trainer import NonFiniteLossError, train_and_evaluate

sys.path.insert(0, str(PROJECT_ROOT))
from configs import demo  # noqa: E402


def smoke_config(**overrides):
    return override(demo.get_config("smoke"), **overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train_and_evaluate(smoke_config(), workdir)


def test_smoke_run_trains_evaluates_and_exports(uninterrupted):
    workdir, result = uninterrupted
    assert result["status"] == "done" and result["step"] == 6
    metrics = read_metrics(workdir)
    assert sorted(metrics) == [2, 4, 6]
    assert "d_weight" not in metrics[2] and metrics[4]["d_weight"] > 0  # GAN from step 4 (disc_start=3)
    for m in metrics.values():
        assert np.isfinite(m["loss"]) and 0 < m["window_utilization"] <= 1
    assert 0 < result["eval/utilization"] <= 1 and result["eval/num_images"] == 16
    assert (workdir / "recon_0000006.png").is_file()
    tok = Tokenizer.load(workdir / "tokenizer")
    images = np.zeros((2, 16, 16, 3), np.float32)
    assert tok.encode(images).shape == (2, 8, 8)


def test_preempted_run_resumes_to_the_same_losses(uninterrupted, tmp_path):
    reference = read_metrics(uninterrupted[0])
    first = train_and_evaluate(smoke_config(), tmp_path, preemption=StopAt(3))
    assert first["status"] == "preempted"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
    second = train_and_evaluate(smoke_config(), tmp_path)
    assert second["status"] == "done"
    # Step 6 averages steps 5-6 in both runs (the resumed run's step-4 line covers step 4 only).
    resumed = read_metrics(tmp_path)[6]
    for key in ("loss", "rec_loss", "quant_loss", "d_loss", "d_weight", "window_utilization"):
        np.testing.assert_allclose(resumed[key], reference[6][key], rtol=1e-6, err_msg=key)
    final = [flatten_dict(Tokenizer.load(w / "tokenizer").variables) for w in (uninterrupted[0], tmp_path)]
    assert final[0].keys() == final[1].keys()
    for path in final[0]:
        np.testing.assert_allclose(final[1][path], final[0][path], rtol=1e-6, atol=1e-7, err_msg=str(path))


@pytest.mark.slow
def test_model_axis_2_trains_like_model_axis_1(uninterrupted, tmp_path):
    # A (4, 2) mesh: the batch split over 4 devices, the frozen codebook's rows over 2 (trainer.PARTITION_RULES).
    result = train_and_evaluate(smoke_config(**{"mesh.model_axis": 2}), tmp_path)
    assert result["status"] == "done"
    reference, metrics = read_metrics(uninterrupted[0]), read_metrics(tmp_path)
    for step in (2, 4, 6):
        for key in ("loss", "rec_loss", "quant_loss", "window_utilization"):
            np.testing.assert_allclose(metrics[step][key], reference[step][key], rtol=1e-4, err_msg=f"{key}@{step}")
    np.testing.assert_allclose(result["eval/psnr"], uninterrupted[1]["eval/psnr"], rtol=1e-4)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path, monkeypatch):
    train_and_evaluate(smoke_config(), tmp_path, preemption=StopAt(3))
    real = steps_lib.losses.reconstruction_loss
    monkeypatch.setattr(steps_lib.losses, "reconstruction_loss", lambda *a, **k: real(*a, **k) * jnp.nan)
    with pytest.raises(NonFiniteLossError, match=r"step 4: non-finite loss .*rec_loss=nan"):
        train_and_evaluate(smoke_config(), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


@pytest.mark.parametrize("key, value, message", [
    ("global_batch_size", 0, "config.global_batch_size=0"),
    ("model.quantizer.name", "lcc", "config.model.quantizer.name='lcc'"),
    ("data.resolution", 15, "config.data.resolution=15"),
    ("codebook_init", "file", "config.codebook_path=''"),
])
def test_invalid_config_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_lib.validate(smoke_config(**{key: value}))


def test_config_typo_is_named():
    config = smoke_config()
    config.lock()
    with pytest.raises(AttributeError, match="totl_steps"):
        config.totl_steps = 3


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    """1 process x 4 devices and 2 processes x 2 devices give the same losses (local jax.distributed)."""
    results = metrics_of_local_processes(
        ["--config", "configs/demo.py:smoke", "--config.total_steps=4", "--config.eval_every_steps=100",
         "--config.log_every_steps=4"], tmp_path, step=4)
    for key in ("loss", "rec_loss", "quant_loss", "d_loss", "window_utilization"):
        np.testing.assert_allclose(results[2][key], results[1][key], rtol=1e-5, err_msg=key)
