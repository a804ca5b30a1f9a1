"""FQGAN in the tokenizer trainer (`configs/fqgan_demo.py:smoke`, 8 fake CPU devices): one step of the `fq` model
with a frozen CLIP teacher (`clip_tiny`) and the GAN on, the loading errors of teachers and `lc` branch codebooks,
the recipe's config keys (no adaptive GAN weight, gradient clipping, constant learning rate), and (slow) a whole
run with `lc` branches: per-branch metrics, evaluation, grid and the exported tokenizer; and the analysis tools
for sub-codebooks (`subsets`, `tsne`)."""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import PROJECT_ROOT, read_metrics
from flax.traverse_util import flatten_dict
from PIL import Image

from vqlc_jax import Tokenizer, losses, metrics
from vqlc_jax.models.build import build_model
from vqlc_jax.train import config as config_lib
from vqlc_jax.train import trainer
from vqlc_jax.train.steps import train_step

sys.path.insert(0, str(PROJECT_ROOT))
from configs import fqgan_demo  # noqa: E402

TEACHER_WIDTH = 64  # clip_tiny's hidden size


def smoke_config(fixtures_dir, *variants, teacher=True):
    c = fqgan_demo.get_config(",".join(("smoke", *variants)))
    if teacher:
        c.model.fq.feat_heads = {"sem": dict(width=TEACHER_WIDTH, num_layers=1, num_heads=2)}
        c.loss.teachers = {"sem": {"name": "clip", "path": str(fixtures_dir / "clip_tiny" / "hf")}}
        c.loss.teacher_size = 32  # the tiny tower's native size (224 in the release)
    return c


@pytest.fixture(scope="module")
def one_step(fixtures_dir):
    """(run, params before, state after, metrics, images) of the second of two GAN steps (the first has learning
    rate 0: the warm-up starts at 0) of the smoke config with a teacher."""
    config = smoke_config(fixtures_dir)
    config.loss.update(adaptive_weight=False, disc_weight=0.5)  # the release's GAN weight
    run = trainer.build_run(config)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
    step = jax.jit(lambda s, x, tv: train_step(run.fns, s, x, None, use_gan=True, teacher_vars=tv))
    with jax.set_mesh(run.mesh):
        state, _ = step(run.init_state(), images, run.teacher_vars)
        params = jax.device_get(state.params)
        after, metrics = step(state, images, run.teacher_vars)
    return run, params, after, jax.device_get(metrics), images


@pytest.mark.slow  # ~60 s of CPU (compiling the step with the teacher and the GAN)
def test_fq_step_trains_every_branch_against_the_frozen_teacher(one_step):
    run, params, after, metrics, images = one_step
    for name in ("vis", "sem"):
        for key in ("quant_loss", "codebook_loss", "commitment_loss", "entropy_loss"):
            assert np.isfinite(metrics[f"{key}_{name}"]), (key, name)
    np.testing.assert_allclose(metrics["quant_loss"], metrics["quant_loss_vis"] + metrics["quant_loss_sem"], rtol=1e-5)
    assert "semantic_loss_vis" not in metrics and 0 < metrics["disentangle_loss"] <= 1
    assert metrics["d_weight"] == 0.5  # loss.adaptive_weight=False: the constant disc_weight

    # The semantic loss is InfoNCE between the head's CLS and the teacher's feature of the same images.
    teacher = dict(run.fns.teachers)["sem"]
    forward = jax.jit(lambda v, x: run.fns.model.apply(v, x, train=True)[2]["branches"]["sem"]["semantic_feat"])
    feat = forward({"params": params, **jax.device_get(after.model_state)}, images)
    want = losses.info_nce_loss(feat[:, 0],
                                teacher.features(run.teacher_vars["sem"], images))
    np.testing.assert_allclose(metrics["semantic_loss_sem"], want, rtol=1e-5)
    weights = {"quant_loss": 1.0, "disentangle_loss": 0.1, "semantic_loss_sem": 0.5}
    want_loss = (metrics["rec_loss"] + 0.5 * metrics["g_loss"] + sum(w * metrics[k] for k, w in weights.items()))
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)

    # Student trained (feature head and both branches' codebooks), teacher outside the state and the optimizer.
    old, new = flatten_dict(params), flatten_dict(jax.device_get(after.params))
    for path in (("feat_heads_sem", "class_embedding"), ("quantizer", "vis", "embedding"),
                 ("quantizer", "sem", "embedding"), ("heads_sem", "adapter", "positional_embedding")):
        assert np.abs(new[path] - old[path]).max() > 0, path
    assert not any("vision_model" in "/".join(p) for p in new)
    # Token counts: one block per sub-codebook, 8 images x 8 x 8 tokens each per step.
    counts = np.asarray(after.window_counts)
    assert counts.shape == (64,) and counts[:32].sum() == counts[32:].sum() == 2 * 8 * 64  # two steps


def test_teachers_and_heads_must_match(fixtures_dir, tmp_path):
    c = smoke_config(fixtures_dir)
    model = build_model(c.model)
    c.loss.teachers.sem.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"teacher 'clip' from .*missing"):
        trainer.load_teachers(c, model)
    c.loss.teachers.sem = {"name": "clip", "path": str(fixtures_dir / "dinov2_tiny" / "hf")}
    with pytest.raises(ValueError, match=r"dinov2_tiny.*model_type 'dinov2'"):
        trainer.load_teachers(c, model)
    c.loss.teachers.sem = {"name": "dinov2", "path": str(fixtures_dir / "dinov2_tiny" / "hf")}
    with pytest.raises(ValueError, match=r"width 32, but model.fq.feat_heads.sem.width is 64"):
        trainer.load_teachers(c, model)
    c.loss.teachers = {}
    with pytest.raises(ValueError, match=r"branch 'sem'.*loss.teachers.sem is missing"):
        trainer.load_teachers(c, model)
    c.loss.semantic_weight = 0.0  # representation loss off: nothing is loaded
    assert trainer.load_teachers(c, model) == ((), {})
    plain = smoke_config(fixtures_dir, teacher=False)  # no heads, no teachers: the demo's default
    assert trainer.load_teachers(plain, build_model(plain.model)) == ((), {})


def test_lc_branches_need_their_codebooks(fixtures_dir, tmp_path):
    c = smoke_config(fixtures_dir, "lc", teacher=False)
    with pytest.raises(ValueError, match=r"config.codebook_paths.vis='': the lc branch 'vis' needs a codebook"):
        trainer._load_codebook(c)
    codebook = np.random.default_rng(0).standard_normal((32, 12)).astype(np.float32)
    np.save(tmp_path / "cb.npy", codebook)
    c.codebook_paths = {"vis": str(tmp_path / "cb.npy"), "sem": str(tmp_path / "cb.npy")}
    loaded = trainer._load_codebook(c)
    assert sorted(loaded) == ["sem", "vis"] and np.array_equal(loaded["sem"], codebook)
    c.codebook_init = "random"
    assert trainer._load_codebook(c) is None


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.decay", "step", "config.optimizer.decay='step'"),
    ("optimizer.grad_clip", -1.0, "config.optimizer.grad_clip=-1.0"),
    ("loss.semantic_weight", -0.5, "config.loss.semantic_weight=-0.5"),
    ("loss.teachers", {"mid": {"name": "clip", "path": ""}}, "config.loss.teachers.mid=.*not a branch"),
    ("loss.teachers", {"sem": {"name": "siglip", "path": ""}}, "config.loss.teachers.sem=.*expected"),
])
def test_invalid_fq_config_values_are_named(fixtures_dir, key, value, message):
    c = smoke_config(fixtures_dir, teacher=False)
    *parents, leaf = key.split(".")
    target = c
    for p in parents:
        target = target[p]
    target[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)


def test_recipe_keys_clip_gradients_and_keep_the_rate_constant():
    opt = config_lib.fqgan_config({"vis": config_lib.L2VQ_16K}, {}).optimizer
    assert (opt.b1, opt.b2, opt.lr, opt.grad_clip, opt.decay, opt.warmup_steps) == (0.9, 0.95, 2e-4, 1.0, "constant", 0)
    schedule = trainer.lr_schedule(opt, 1000, opt.lr)
    assert [float(schedule(s)) for s in (1, 500, 999)] == pytest.approx([2e-4] * 3)
    params, grads = {"w": jnp.zeros(4)}, {"w": jnp.full(4, 100.0)}
    clipped = trainer.make_optimizer(opt, 1000, opt.lr)
    opt.grad_clip = 0.0
    plain = trainer.make_optimizer(opt, 1000, opt.lr)
    assert isinstance(plain.init(params), tuple) and len(clipped.init(params)) == 2
    # Adam's first update is scale-free, so compare the second moment: the clipped one saw |g| = 1.
    state = clipped.update(grads, clipped.init(params), params)[1]
    nu = optax.tree_utils.tree_get(state, "nu")["w"]
    np.testing.assert_allclose(nu, (1 - 0.95) * (100.0 / np.linalg.norm(grads["w"])) ** 2, rtol=1e-5)


@pytest.mark.slow
def test_smoke_run_with_lc_branches_and_a_teacher(fixtures_dir, tmp_path):
    codebook = np.random.default_rng(0).standard_normal((32, 12)).astype(np.float32)
    np.save(tmp_path / "cb.npy", codebook)
    c = smoke_config(fixtures_dir, "lc")
    c.codebook_paths = {"vis": str(tmp_path / "cb.npy"), "sem": str(tmp_path / "cb.npy")}
    result = trainer.train_and_evaluate(c, tmp_path / "run")
    assert result["status"] == "done" and result["step"] == 6
    metrics = read_metrics(tmp_path / "run")
    for m in metrics.values():
        for name in ("vis", "sem"):
            assert 0 < m[f"window_utilization_{name}"] <= 1 and np.isfinite(m[f"quant_loss_{name}"])
        assert np.isfinite(m["semantic_loss_sem"]) and np.isfinite(m["loss"])
    for name in ("vis", "sem"):
        assert 0 < result[f"eval/utilization_{name}"] <= 1
    assert (tmp_path / "run" / "recon_0000006.png").is_file()
    tok = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert tok.codebook_names == ("vis", "sem") and tok.codebook_sizes == (32, 32)
    for name in ("vis", "sem"):  # the frozen codebooks came from the file and stayed frozen
        np.testing.assert_array_equal(tok.variables["codebook"]["quantizer"][name]["embedding"], codebook)
    tokens = tok.encode(np.zeros((2, 16, 16, 3), np.float32))
    assert tokens.shape == (2, 2, 8, 8)


# ------------------------------------------------------------------------------------------------ analysis
FRESH = {"ddconfig": dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, resolution=16), "embed_dim": 4,
         "quantizer": {"name": "fq", "branches": [{"name": "vis", "quantizer": {"name": "l2vq", "num_codes": 32}},
                                                  {"name": "sem", "quantizer": {"name": "l2vq", "num_codes": 16}}]},
         "fq": {"adapter_layers": 1, "adapter_heads": 2}}


EVAL_CONFIG = """import ml_collections


def get_config(arg=None):
    return ml_collections.ConfigDict(dict(batch_size=4, data=dict(
        name="bundled", options={"resolution": 16}, resolution=16, eval_split="validation", eval_max_images=6)))
"""


def test_tsne_colours_codes_by_sub_codebook(tmp_path):
    from vqlc_jax.analysis import plots, tsne

    rng = np.random.default_rng(0)
    codebook = np.concatenate([rng.normal(0, 1, (30, 4)), rng.normal(5, 1, (20, 4))]).astype(np.float32)
    groups, counts = np.repeat([0, 1], [30, 20]), (np.arange(50) % 3 == 0).astype(np.int64)
    result = tsne.tsne_codes(codebook, counts, sample=40, seed=0, groups=groups, group_names=("vis", "sem"))
    np.testing.assert_array_equal(result.groups, groups[result.indices])
    summary = result.summary(50)
    assert summary["sampled_vis"] + summary["sampled_sem"] == 40
    assert summary["sampled_active_sem"] == int(counts[result.indices][result.groups == 1].astype(bool).sum())
    # The two sub-codebooks lie apart in D', and apart in the embedding: every point's nearest neighbour is its own.
    d = np.linalg.norm(result.points[:, None] - result.points[None], axis=-1) + np.eye(40) * 1e9
    assert np.array_equal(result.groups[d.argmin(1)], result.groups)
    assert plots.plot_tsne(result, tmp_path / "tsne.png").is_file()


@pytest.mark.slow  # ~45 s of CPU: compiles a tokenizer's encode and three decodes
def test_subsets_and_tsne_of_a_factorized_tokenizer(tmp_path, monkeypatch):
    """The `subsets` and `tsne` tools on a freshly initialised Dual tokenizer (consistency only: random weights)."""
    from vqlc_jax.analysis import replacement
    from vqlc_jax.analysis.__main__ import main as cli

    tok = Tokenizer.create(FRESH, seed=0)
    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, directory: tok))  # one set of compilations
    (tmp_path / "eval16.py").write_text(EVAL_CONFIG)
    cli(["subsets", "--tokenizer", "TOK", "--config", str(tmp_path / "eval16.py"), "--grid-images", "4",
         "--output", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "subsets.json").read_text())
    assert [r["codebooks"] for r in data["rows"]] == ["all", "vis", "sem"] and data["fill"] == "mean"
    images = np.concatenate(list(replacement.eval_batches(ml_collections.ConfigDict(data["data"]), 4)()))
    assert images.shape[0] == 6
    tokens = tok.encode(images)
    originals = (images + 1) / 2
    for row, codebooks in zip(data["rows"], (None, ("vis",), ("sem",))):
        decoded = np.clip((np.asarray(tok.decode(tokens, codebooks=codebooks)) + 1) / 2, 0, 1)
        assert row["psnr"] == pytest.approx(float(np.mean(metrics.psnr(originals, decoded))), rel=1e-5)
    assert len({r["psnr"] for r in data["rows"]}) == 3
    grid = np.asarray(Image.open(tmp_path / "out" / "subsets.png"))
    assert grid.shape == (4 * (64 + 14), 4 * 64, 3)  # original, all, vis, sem; 16 px enlarged to 64, captions

    counts = np.zeros(48, np.int64)
    counts[[0, 1, 40]] = 1
    cli(["tsne", "--tokenizer", "TOK", "--counts", str(_save(tmp_path / "c.npy", counts)), "--sample", "48",
         "--output", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "tsne.json").read_text())
    assert (summary["sampled_vis"], summary["sampled_sem"]) == (32, 16)
    assert (summary["sampled_active_vis"], summary["sampled_active_sem"]) == (2, 1)
    assert (tmp_path / "out" / "tsne.png").is_file()


def _save(path, array):
    np.save(path, array)
    return path
