"""The evaluation job on a tiny tokenizer: metrics over the split equal a direct computation, unavailable metrics
are reported with their reason, the CLI writes its report."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from conftest import PROJECT_ROOT

from vqlc_jax import Tokenizer, evaluate, metrics, parallel
from vqlc_jax import data as data_lib

DATA = ml_collections.ConfigDict(dict(name="bundled", options={"resolution": 16}, resolution=16,
                                      eval_split="validation", eval_max_images=12))
MODEL = {"ddconfig": dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                          resolution=16), "embed_dim": 4,
         "quantizer": {"name": "lc", "num_codes": 64, "codebook_dim": 16}}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.create(MODEL, seed=3)


@pytest.fixture(scope="module")
def result(tok):
    lpips, fid, unavailable = evaluate.load_metric_models("", "/nonexistent/pt_inception.pth")
    assert lpips is None and fid is None
    return evaluate.evaluate_tokenizer(tok.model, tok.variables, DATA, num_codes=64, batch_size=8,
                                       mesh=parallel.make_mesh(), unavailable=unavailable)


def test_metrics_equal_a_direct_computation(tok, result):
    source = data_lib.Subset(data_lib.make_source("bundled", "validation", {"resolution": 16}), 12)
    images = np.concatenate([b.image[b.mask] for b in data_lib.make_pipeline(
        source, resolution=16, global_batch_size=12, seed=0, train=False)])
    recon, tokens, _ = tok.reconstruct(images)
    x, r = (images + 1) / 2, np.clip((np.asarray(recon) + 1) / 2, 0, 1)
    s = result.scalars
    assert s["num_images"] == 12
    np.testing.assert_allclose(s["psnr"], np.mean(metrics.psnr(x, r)), rtol=1e-5)
    np.testing.assert_allclose(s["ssim"], np.mean(metrics.ssim(x, r)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.counts, np.bincount(np.asarray(tokens).ravel(), minlength=64))
    assert s["utilization"] == len(np.unique(tokens)) / 64
    assert result.originals.shape == result.reconstructions.shape == (8, 16, 16, 3)


def test_unavailable_metrics_are_reported_not_computed(result, tmp_path):
    assert "lpips" not in result.scalars and "rfid" not in result.scalars
    assert "no weights file given" in result.unavailable["lpips"]
    assert "/nonexistent/pt_inception.pth" in result.unavailable["rfid"]
    report = evaluate.write_report(result, tmp_path, name="tiny")
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["num_images"] == 12
    assert report["conventions"]["ssim"].startswith("11-tap Gaussian")
    table = (tmp_path / "eval.md").read_text()
    assert "| tiny |" in table and "n/a" in table and "rfid unavailable" in table
    assert np.load(tmp_path / "code_counts.npy").sum() == 12 * 8 * 8
    # 16 px crops enlarged 4x (nearest neighbour) under a 14 px caption: 2 rows of 64 px, 8 crops of 64 px.
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (14 + 2 * 64, 8 * 64, 3)
    top_left = grid[14:18, :4]  # one source pixel became a 4 x 4 block
    assert (top_left == top_left[0, 0]).all()
    assert (grid[:14] < 128).any()  # the caption's text


def test_cli_writes_the_report(tok, tmp_path):
    tok.save(tmp_path / "tok")
    subprocess.run([sys.executable, "-m", "vqlc_jax.evaluate", "--tokenizer", str(tmp_path / "tok"),
                    "--config", "configs/eval/demo.py", "--config.data.resolution=16",
                    "--config.data.options.resolution=16", "--config.data.eval_max_images=8",
                    "--output", str(tmp_path / "out")], cwd=PROJECT_ROOT, check=True, capture_output=True,
                   timeout=300)
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["metrics"]["num_images"] == 8 and set(report["unavailable"]) == {"lpips", "rfid"}
