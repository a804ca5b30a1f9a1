"""Generation metrics: Inception Score and k-NN precision / recall against straightforward numpy versions of the
published algorithms, clean-fid's resize against PIL, the Inception logits, the evaluation core (random-weight
Inception: a mechanism check only, its numbers mean nothing), ADM reference files and merging over processes."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats
from conftest import PROJECT_ROOT, relative_error
from PIL import Image
from test_inception import FIXTURE, random_state_dict

from vqlc_jax import metrics, parallel
from vqlc_jax.convert import inception_weights
from vqlc_jax.convert.npz_variables import save_variables
from vqlc_jax.generators import evaluate as gen_eval
from vqlc_jax.models.inception import FEATURE_DIM, LOGITS_DIM, InceptionV3, resize_bilinear, resize_clean


# ---- Inception Score. ------------------------------------------------------------------------------------------------
def _reference_inception_score(logits, splits):
    """improved-gan's formula per split, with torch-fidelity's split bounds i N // s (no shuffle)."""
    n = len(logits)
    scores = []
    for i in range(splits):
        p = scipy.special.softmax(logits[i * n // splits:(i + 1) * n // splits].astype(np.float64), axis=1)
        kl = p * (np.log(p) - np.log(np.mean(p, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_the_published_formula():
    logits = 3.0 * np.random.default_rng(0).standard_normal((103, 20)).astype(np.float32)
    for splits in (1, 10):
        got = metrics.inception_score(logits, splits)
        np.testing.assert_allclose(got, _reference_inception_score(logits, splits), rtol=1e-12)
    mean, std = metrics.inception_score(logits)
    assert 1.0 < mean < 20.0 and std > 0.0


def test_inception_score_limits_and_errors():
    np.testing.assert_allclose(metrics.inception_score(np.zeros((40, 7))), (1.0, 0.0), atol=1e-12)
    classes = 16  # confident predictions spread evenly over the classes in every split: IS = C
    confident = 200.0 * np.eye(classes)[np.arange(10 * 2 * classes) % classes]
    np.testing.assert_allclose(metrics.inception_score(confident), (classes, 0.0), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="num_splits=11"):
        metrics.inception_score(np.zeros((10, 3)), 11)
    with pytest.raises(ValueError, match=r"\(10,\)"):
        metrics.inception_score(np.zeros(10))


# ---- Precision and recall. -------------------------------------------------------------------------------------------
def _reference_precision_recall(real, fake, k):
    """Kynkaanniemi et al.: radius = distance to the k-th nearest other point of the same set, float64."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))

    def radii(x):
        d = dist(x, x)
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    cross = dist(real, fake)  # [N, M]
    precision = np.mean([np.any(cross[:, j] <= radii(real)) for j in range(len(fake))])
    recall = np.mean([np.any(cross[i, :] <= radii(fake)) for i in range(len(real))])
    return precision, recall


def test_precision_recall_matches_the_published_algorithm():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((60, 8)).astype(np.float32)
    fake = (rng.standard_normal((45, 8)) + 1.5).astype(np.float32)  # shifted
    want = _reference_precision_recall(real, fake, 3)
    assert 0.05 < min(want) and max(want) < 0.95  # a case where both are informative
    assert metrics.precision_recall(real, fake, 3, block_rows=7) == want
    assert metrics.precision_recall(real, fake) == want
    assert metrics.precision_recall(real, fake, 5) == _reference_precision_recall(real, fake, 5)


def test_precision_recall_limits_blocks_and_errors(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    assert metrics.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(x, x[:30] + 100.0) == (0.0, 0.0)

    shapes = []
    distances = metrics._squared_distances
    monkeypatch.setattr(metrics, "_squared_distances", lambda a, b: shapes.append(a.shape[0]) or distances(a, b))
    metrics.precision_recall(x, x[:30] + 0.5, block_rows=8)
    assert max(shapes) == 8 and sum(shapes) == 50 + 30 + 50  # both radii passes and the cross pass, in blocks
    monkeypatch.undo()

    with pytest.raises(ValueError, match=r"k=3 needs.*fake 3"):
        metrics.precision_recall(x, x[:3])
    with pytest.raises(ValueError, match=r"\(50, 16\).*\(50, 8\)"):
        metrics.precision_recall(x, x[:, :8])


# ---- Resizes. --------------------------------------------------------------------------------------------------------
def test_clean_resize_matches_pil_per_channel_float_bicubic():
    images = np.random.default_rng(3).integers(0, 256, (2, 37, 23, 3), dtype=np.uint8)
    got = resize_clean(images, (29, 41))
    assert got.shape == (2, 29, 41, 3) and got.dtype == np.float32
    for b in range(2):
        for c in range(3):
            plane = Image.fromarray(images[b, :, :, c].astype(np.float32))
            assert plane.mode == "F"
            np.testing.assert_array_equal(got[b, :, :, c], np.asarray(plane.resize((41, 29), Image.BICUBIC)))
    assert resize_clean(images[:1]).shape == (1, 299, 299, 3) and resize_clean(images[:0]).shape == (0, 299, 299, 3)
    with pytest.raises(ValueError, match="uint8"):
        resize_clean(images.astype(np.float32))


def test_clean_resize_antialiases_where_legacy_does_not():
    checker = (255 * (np.indices((48, 48)).sum(0) % 2)).astype(np.uint8)
    images = np.repeat(checker[None, :, :, None], 3, axis=-1)
    clean = resize_clean(images, (16, 16))
    legacy = np.asarray(resize_bilinear(images.astype(np.float32), (16, 16)))
    assert np.abs(clean - 127.5).max() < 2.0  # a 3x shrink of a 1-pixel checkerboard averages it (measured 1.1)
    assert np.abs(legacy - 127.5).max() == 127.5  # samples single pixels: aliased


# ---- Inception logits. -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state_dict() -> dict:
    with np.load(FIXTURE) as data:
        shapes = [(k, tuple(s)) for k, s in json.loads(str(data["state_dict_shapes"]))]
    return random_state_dict(shapes)


@pytest.fixture(scope="module")
def fid_model(state_dict):
    """(InceptionV3(), variables) from seeded random weights: for the mechanism only."""
    return InceptionV3(), inception_weights.inception_from_pytorch_fid(state_dict)


def test_npz_without_the_classifier_still_loads(tmp_path, fid_model):
    _, variables = fid_model
    full, old = tmp_path / "full.npz", tmp_path / "old.npz"
    save_variables(variables, full)
    save_variables({"params": {k: v for k, v in variables["params"].items() if k != "fc"},
                    "batch_stats": variables["batch_stats"]}, old)
    model, loaded = metrics.load_fid_model(full)
    assert isinstance(model, InceptionV3) and inception_weights.has_logits(loaded)
    model, loaded = metrics.load_fid_model(old)
    assert isinstance(model, InceptionV3) and not inception_weights.has_logits(loaded)


# ---- The evaluation core. --------------------------------------------------------------------------------------------
NUM_CODES = 64


def _image_set(seed: int, n: int = 10, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images in [-1, 1] (upsampled noise) and random token maps [n, 4, 4] over NUM_CODES codes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, size // 8, size // 8, 3))
    images = np.clip(coarse.repeat(8, 1).repeat(8, 2) + 0.1 * rng.standard_normal((n, size, size, 3)), -1, 1)
    return images.astype(np.float32), rng.integers(0, NUM_CODES // 2, (n, 4, 4)).astype(np.int32)


def _batches(images, tokens, sizes):
    bounds = np.cumsum([0, *sizes])
    return [(images[a:b], None if tokens is None else tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.fixture(scope="module")
def sets(fid_model):
    """Two image sets and their Inception outputs computed directly (legacy resize: uint8 / 255 into the model)."""
    model, variables = fid_model
    apply = jax.jit(InceptionV3(with_logits=True).apply)
    out = {}
    for name, seed in (("real", 5), ("fake", 6)):
        images, tokens = _image_set(seed)
        pool, logits = apply(variables, gen_eval.quantise(images).astype(np.float32) / 255.0)
        out[name] = dict(images=images, tokens=tokens, pool=np.asarray(pool), logits=np.asarray(logits))
    return out


def test_logits_are_pool_features_times_the_fc_weights(state_dict, sets):
    pool, logits = sets["real"]["pool"], sets["real"]["logits"]
    assert pool.shape == (10, FEATURE_DIM) and logits.shape == (10, LOGITS_DIM)
    want = pool.astype(np.float64) @ state_dict["fc.weight"].T.astype(np.float64)  # no bias, as the IS takes it
    assert relative_error(logits, want) <= 1e-5


@pytest.fixture(scope="module")
def one_device():
    """A one-device mesh: compiles fast here (one test runs on all 8 fake devices)."""
    return parallel.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def real_reference(fid_model, sets, one_device):
    """reference_from_images of the real set, in batches of 4, 4 and 2."""
    real = sets["real"]
    return gen_eval.reference_from_images([b for b, _ in _batches(real["images"], None, (4, 4, 2))], fid=fid_model,
                                          resize="legacy", mesh=one_device, description="set A")


def test_reference_statistics_of_real_images(sets, real_reference):
    reference, features = real_reference
    assert relative_error(features, sets["real"]["pool"]) <= 1e-5
    stats = metrics.FeatureStats.zeros(FEATURE_DIM)
    stats.update(sets["real"]["pool"])
    assert relative_error(reference.mu, stats.mu) <= 1e-5 and relative_error(reference.sigma, stats.sigma) <= 1e-5
    assert reference.n == 10 and reference.description == "set A, legacy resize"


def test_generated_metrics_equal_the_metric_functions_on_the_features(fid_model, sets, real_reference, monkeypatch):
    real, fake = sets["real"], sets["fake"]
    reference, features = real_reference
    frechet_args = []  # the Frechet distance itself is tested in test_metrics (and costs seconds at 2048-d)
    monkeypatch.setattr(metrics, "frechet_distance", lambda *args: frechet_args.append(args) or 12.5)
    result = gen_eval.evaluate_generated(_batches(fake["images"], fake["tokens"], (8, 2)), fid=fid_model,
                                         reference=reference, reference_features=features, num_codes=NUM_CODES,
                                         resize="legacy")  # the default 8-device mesh: the batch of 2 is padded
    s = result.scalars
    assert result.unavailable == {} and s["num_samples"] == 10 and s["fid"] == 12.5
    stats = metrics.FeatureStats.zeros(FEATURE_DIM)
    stats.update(fake["pool"])
    (mu, sigma, ref_mu, ref_sigma), = frechet_args
    assert relative_error(mu, stats.mu) <= 1e-5 and relative_error(sigma, stats.sigma) <= 1e-5
    assert ref_mu is reference.mu and ref_sigma is reference.sigma
    np.testing.assert_allclose([s["inception_score"], s["inception_score_std"]],
                               metrics.inception_score(fake["logits"], 10), rtol=1e-5)
    assert (s["precision"], s["recall"]) == metrics.precision_recall(real["pool"], fake["pool"], 3)
    counts = np.bincount(fake["tokens"].ravel(), minlength=NUM_CODES)
    np.testing.assert_array_equal(result.counts, counts)
    assert s["utilization"] == np.mean(counts > 0)
    np.testing.assert_allclose(s["perplexity"], np.exp(scipy.stats.entropy(counts)), rtol=1e-5)


@pytest.mark.slow
def test_a_set_against_its_own_reference(fid_model, sets, real_reference):
    real = sets["real"]
    reference, features = real_reference
    result = gen_eval.evaluate_generated(_batches(real["images"], real["tokens"], (8, 2)), fid=fid_model,
                                         reference=reference, reference_features=features, num_codes=NUM_CODES,
                                         resize="legacy")  # the shapes of the test above: compiled once
    assert abs(result.scalars["fid"]) <= 1e-5 * np.trace(reference.sigma)  # rank-deficient (10 < 2048): ~2e-6
    assert (result.scalars["precision"], result.scalars["recall"]) == (1.0, 1.0)


def test_clean_resize_path(fid_model, sets, one_device):
    model, variables = fid_model
    images = sets["real"]["images"][:4]
    reference, features = gen_eval.reference_from_images([images], fid=fid_model, resize="clean",
                                                         mesh=one_device)
    want = jax.jit(InceptionV3(resize_input=False).apply)(variables, resize_clean(gen_eval.quantise(images)) / 255.0)
    assert relative_error(features, want) <= 1e-5
    assert reference.description == "4 real images, clean resize"


def test_unavailable_metrics_carry_their_reasons(fid_model, sets, tmp_path):
    fake = sets["fake"]
    batches = _batches(fake["images"], fake["tokens"], (6, 4))
    missing = metrics.load_fid_model(tmp_path / inception_weights.PYTORCH_FID_FILE)
    result = gen_eval.evaluate_generated(batches, fid=missing, reference=None, reference_features=None,
                                         num_codes=NUM_CODES)
    assert set(result.unavailable) == {"fid", "inception_score", "precision_recall"}
    assert all(inception_weights.PYTORCH_FID_FILE in reason for reason in result.unavailable.values())
    assert result.scalars["utilization"] == len(np.unique(fake["tokens"])) / NUM_CODES
    assert set(result.scalars) == {"num_samples", "utilization", "perplexity"}

    model, variables = fid_model
    no_fc = (model, {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
                     "batch_stats": variables["batch_stats"]})
    result = gen_eval.evaluate_generated(_batches(fake["images"], None, (6, 4)), fid=no_fc, reference=None,
                                         reference_features=None, num_codes=None)
    assert set(result.unavailable) == {"fid", "inception_score", "precision_recall", "utilization"}
    assert "fc classifier" in result.unavailable["inception_score"]
    assert "no reference statistics" in result.unavailable["fid"] and result.counts is None

    report = gen_eval.write_generation_report(result, tmp_path / "report", name="tiny", extra={"seed": 0})
    saved = json.loads((tmp_path / "report" / "gen_eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["num_samples"] == 10 and saved["resize"] == "clean" and saved["seed"] == 0
    assert saved["fid_protocol"] == "Inception (pytorch-fid weights) FID vs no reference"
    assert saved["unavailable"]["utilization"] == "no codebook size (num_codes) given"
    table = (tmp_path / "report" / "gen_eval.md").read_text()
    assert "| tiny | 10 | n/a |" in table and "| clean |" in table and "inception_score unavailable" in table
    assert not (tmp_path / "report" / "gen_code_counts.npy").exists()


def test_too_few_samples_are_reported(fid_model, sets, real_reference):
    fake = sets["fake"]
    result = gen_eval.evaluate_generated([(fake["images"][:3], fake["tokens"][:3])], fid=fid_model, reference=None,
                                         reference_features=real_reference[1], num_codes=NUM_CODES, resize="legacy")
    assert result.unavailable["inception_score"] == "needs at least 10 samples (one per split), got 3"
    assert result.unavailable["precision_recall"] == "needs at least 4 samples and reference images (k + 1), got 3"
    assert result.scalars["num_samples"] == 3 and "utilization" in result.scalars


def test_bad_inputs_are_named(fid_model, sets, one_device):
    fake = sets["fake"]
    bad_tokens = fake["tokens"].copy()
    bad_tokens[3, 1, 2] = NUM_CODES
    with pytest.raises(ValueError, match=r"batch 0: token values span \[0, 64\].*\[0, 64\)"):
        gen_eval.evaluate_generated([(fake["images"], bad_tokens)], fid=metrics.Unavailable("rFID", "x"),
                                    reference=None, reference_features=None, num_codes=NUM_CODES)
    with pytest.raises(ValueError, match="resize='bicubic'"):
        gen_eval.evaluate_generated([(fake["images"], None)], fid=fid_model, reference=None,
                                    reference_features=None, num_codes=None, resize="bicubic")
    with pytest.raises(ValueError, match=r"batch 1 has 6 images, more than the first batch's 4"):
        gen_eval.reference_from_images([fake["images"][:4], fake["images"][4:]], fid=fid_model, resize="legacy",
                                       mesh=one_device)
    with pytest.raises(ValueError, match=r"reference_features \(10, 7\)"):
        gen_eval.evaluate_generated([], fid=fid_model, reference=None, reference_features=np.zeros((10, 7)),
                                    num_codes=None)
    with pytest.raises(ValueError, match="Inception weights: gone"):
        gen_eval.reference_from_images([fake["images"]], fid=metrics.Unavailable("rFID", "gone"), resize="clean")


# ---- ADM reference batches. ------------------------------------------------------------------------------------------
def test_load_adm_reference(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.standard_normal(FEATURE_DIM), np.eye(FEATURE_DIM)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(7), sigma_s=np.eye(7))
    ref = gen_eval.load_adm_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.n == 5 and "ref.npz" in ref.description
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    assert gen_eval.load_adm_reference(tmp_path / "stats_only.npz").n == 0

    np.savez(tmp_path / "no_sigma.npz", mu=mu)
    with pytest.raises(KeyError, match=r"no_sigma\.npz.*needs sigma"):
        gen_eval.load_adm_reference(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "small.npz", mu=mu[:7], sigma=sigma)
    with pytest.raises(ValueError, match=r"small\.npz: mu \(7,\)"):
        gen_eval.load_adm_reference(tmp_path / "small.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        gen_eval.load_adm_reference(tmp_path / "absent.npz")


# ---- Merging over processes. -----------------------------------------------------------------------------------------
class TinyInception(nn.Module):
    """A stand-in with InceptionV3's interface and output sizes (one dense layer on the pixels), cheap enough to run
    the whole job in two processes."""

    resize_input: bool = True
    with_logits: bool = False

    @nn.compact
    def __call__(self, images):
        pool = nn.relu(nn.Dense(FEATURE_DIM, name="pool")(images.reshape(len(images), -1)))
        return (pool, nn.Dense(LOGITS_DIM, use_bias=False, name="fc")(pool)) if self.with_logits else pool


def tiny_job(process_index: int, process_count: int, batch_sizes: tuple[int, ...]) -> dict:
    """reference_from_images and evaluate_generated with TinyInception on this process's share of 12 + 12 images."""
    model = TinyInception()
    variables = model.clone(with_logits=True).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    (real, _), (fake, tokens) = _image_set(5, 12, 16), _image_set(6, 12, 16)
    share = slice(process_index * 12 // process_count, (process_index + 1) * 12 // process_count)
    reference, features = gen_eval.reference_from_images([real[share]], fid=(model, variables), resize="legacy")
    result = gen_eval.evaluate_generated(_batches(fake[share], tokens[share], batch_sizes), fid=(model, variables),
                                         reference=None, reference_features=features, num_codes=NUM_CODES,
                                         resize="legacy")
    return {"mu": reference.mu, "sigma": reference.sigma, "features": features, "counts": result.counts,
            **{k: np.float64(v) for k, v in result.scalars.items()}}


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    sys.path.insert(0, "tests")
    from test_gen_metrics import tiny_job
    from vqlc_jax import evaluate, metrics
    p = jax.process_index()
    rows = np.arange(3 + 2 * p, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32) + 10 * p
    total = evaluate.sum_over_processes({"x": np.float64(1.0 + 1e-12 * (p + 1)), "c": np.arange(3) + p})
    stats = metrics.FeatureStats.zeros(4)
    stats.update(rows)
    merged = evaluate.merge_over_processes(stats)
    job = {f"job/{k}": v for k, v in tiny_job(p, 2, (4, 0, 2)).items()}
    np.savez(sys.argv[3], rows=evaluate.concat_over_processes(rows), x=total["x"], c=total["c"], n=merged.n,
             sum=merged.total, outer=merged.outer, **job)
""")


def test_two_processes_agree_with_one(tmp_path):
    """Two local processes x 2 devices: sums stay exact in float64, rows of different counts concatenate in process
    order, and the evaluation job gives what one process with all the rows gives."""
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    address = f"127.0.0.1:{20000 + os.getpid() % 20000}"
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, address, str(i), str(tmp_path / f"{i}.npz")],
                              cwd=PROJECT_ROOT, env=env, stderr=subprocess.PIPE) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read().decode()[-3000:]
    one = tiny_job(0, 1, (8, 4))
    assert set(one) == {"mu", "sigma", "features", "counts", "num_samples", "inception_score", "inception_score_std",
                        "precision", "recall", "utilization", "perplexity"}
    rows = np.concatenate([np.arange(3)[:, None] * np.ones((1, 4)), np.arange(5)[:, None] * np.ones((1, 4)) + 10])
    for i in range(2):
        with np.load(tmp_path / f"{i}.npz") as out:
            np.testing.assert_array_equal(out["rows"], rows)
            assert out["x"] == np.float64(1.0 + 1e-12) + np.float64(1.0 + 2e-12)  # a float32 trip would lose it
            np.testing.assert_array_equal(out["c"], [1, 3, 5])
            assert out["n"] == 8
            np.testing.assert_array_equal(out["sum"], rows.sum(0))
            np.testing.assert_array_equal(out["outer"], rows.T @ rows)
            for key, want in one.items():
                np.testing.assert_allclose(out[f"job/{key}"], want, rtol=1e-5, atol=1e-6, err_msg=key)
