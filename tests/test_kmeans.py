"""Mini-batch k-means (vqlc_jax.codebook.kmeans): correctness against known blobs and scikit-learn, chunking, bf16,
determinism, 8 devices vs 1, resume, reassignment, per-class mode, inits, streamed sources, errors, output files."""

import json

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from vqlc_jax.codebook.kmeans import (
    NpyShards,
    build_codebook,
    codebook_from_features,
    inertia,
    minibatch_kmeans,
    save_codebook,
)
from vqlc_jax.codebook.kmeans_search import nearest_centres
from vqlc_jax.quantizers import load_codebook

DIM, NUM_BLOBS = 8, 6
# Shared by most tests so that they hit one compiled program.
RUN = {"batch_size": 128, "num_steps": 40, "seed": 0, "num_devices": 1, "steps_per_call": 16}


def blobs(num_blobs=NUM_BLOBS, per_blob=500, dim=DIM, spread=20.0, seed=0):
    """Well-separated Gaussian blobs: (points [n, dim] float32 shuffled, true means, blob of each point)."""
    rng = np.random.default_rng(seed)
    means = spread * rng.standard_normal((num_blobs, dim))
    which = rng.permutation(np.repeat(np.arange(num_blobs), per_blob))
    return (means[which] + rng.standard_normal((which.size, dim))).astype(np.float32), means, which


def matched_error(centres, means):
    """Largest distance between each true mean and its centre under the best one-to-one matching."""
    cost = np.linalg.norm(centres[:, None] - means[None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].max()


def brute_force(x, centres):
    d = ((x[:, None, :].astype(np.float64) - centres[None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


@pytest.fixture(scope="module")
def data():
    return blobs()


@pytest.fixture(scope="module")
def reference(data):
    """The shared uninterrupted run."""
    return minibatch_kmeans(data[0], NUM_BLOBS, **RUN)


def test_recovers_blobs(data, reference):
    x, means, _ = data
    assert reference.shape == (NUM_BLOBS, DIM) and reference.dtype == np.float32
    assert matched_error(reference, means) < 0.2  # noise std 1, ~500 points per blob
    np.testing.assert_allclose(inertia(x, reference), brute_force(x, reference)[1].sum(), rtol=1e-5)


def test_inertia_within_2_percent_of_sklearn():
    # Overlapping mixture, more centres than components: the result depends on the algorithm, not only the data.
    rng = np.random.default_rng(1)
    x = (2.0 * rng.standard_normal((40, 8))[rng.integers(0, 40, 8192)] + rng.standard_normal((8192, 8)))
    x = x.astype(np.float32)
    ours, theirs = [], []
    for seed in range(2):
        ours.append(inertia(x, minibatch_kmeans(x, 64, batch_size=512, num_steps=160, seed=seed, num_devices=1)))
        with threadpool_limits(1, "openmp"):  # scikit-learn's OpenMP threads crawl on a shared CPU
            model = MiniBatchKMeans(64, batch_size=512, max_iter=10, n_init=1, tol=0.0, max_no_improvement=None,
                                    compute_labels=False, random_state=seed).fit(x)
        assert model.n_steps_ == 160
        theirs.append(inertia(x, model.cluster_centers_))
    assert np.mean(ours) <= 1.02 * np.mean(theirs), (ours, theirs)


def test_search_chunked_equals_unchunked_and_brute_force():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    centres = rng.standard_normal((70, 24)).astype(np.float32)
    whole = nearest_centres(x, centres, chunk_size=70, row_chunk=300)
    chunked = nearest_centres(x, centres, chunk_size=16, row_chunk=64)  # ragged last chunk and row block
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])
    labels, dist = brute_force(x, centres)
    np.testing.assert_array_equal(whole[0], labels)
    np.testing.assert_allclose(whole[1], dist, rtol=1e-5)
    # Ties go to the lowest index, across chunks too.
    tied = nearest_centres(x[:5], np.concatenate([centres[:3], centres[:3]]), chunk_size=2, row_chunk=2)[0]
    assert (np.asarray(tied) < 3).all()


def test_kmeans_chunked_equals_unchunked(data, reference):
    chunked = minibatch_kmeans(data[0], NUM_BLOBS, **RUN, chunk_size=4, row_chunk=8)
    np.testing.assert_allclose(chunked, reference, rtol=1e-6, atol=1e-6)


def test_bf16_search_close():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    centres = rng.standard_normal((256, 64)).astype(np.float32)
    f32, bf16 = (nearest_centres(x, centres, dot_dtype=d) for d in ("float32", "bfloat16"))
    assert np.mean(np.asarray(f32[0]) == np.asarray(bf16[0])) > 0.9
    assert float(bf16[1].sum()) <= 1.01 * float(f32[1].sum())  # bf16 picks near-ties: barely worse


def test_bf16_kmeans_close(data, reference):
    x, means, _ = data
    centres = minibatch_kmeans(x, NUM_BLOBS, **RUN, dot_dtype="bfloat16")
    assert matched_error(centres, means) < 0.2
    assert inertia(x, centres) <= 1.01 * inertia(x, reference)


def test_deterministic_for_a_seed(data, reference):
    x = data[0]
    np.testing.assert_array_equal(minibatch_kmeans(x, NUM_BLOBS, **RUN), reference)
    other = minibatch_kmeans(x, NUM_BLOBS, **{**RUN, "seed": 1})
    assert not np.array_equal(other, reference)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices, set by conftest")
def test_eight_devices_match_one(data, reference):
    # Same batches (keys do not depend on the sharding); only the cross-device sum of each centre's points is
    # added in another order (per-device partial sums, then an all-reduce), so centres agree to float rounding.
    x = data[0]
    eight = minibatch_kmeans(x, NUM_BLOBS, **{**RUN, "num_devices": 8})
    np.testing.assert_allclose(eight, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inertia(x, eight, num_devices=8), inertia(x, reference), rtol=1e-5)


def test_resume_equals_uninterrupted(data, reference, tmp_path):
    x = data[0]
    first = minibatch_kmeans(x, NUM_BLOBS, **{**RUN, "num_steps": 21}, checkpoint_dir=str(tmp_path),
                             checkpoint_every=16)
    assert not np.array_equal(first, reference)
    resumed = minibatch_kmeans(x, NUM_BLOBS, **RUN, checkpoint_dir=str(tmp_path))
    np.testing.assert_array_equal(resumed, reference)
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_kmeans(x, NUM_BLOBS, **{**RUN, "batch_size": 64}, checkpoint_dir=str(tmp_path))


def test_dead_centres_are_reseeded(data):
    x, _, which = data
    # Duplicates of one centre never win a point (ties go to the lowest index) until they are moved.
    init = np.repeat(x[which == 0][:1], NUM_BLOBS, axis=0)
    logged = []
    centres = minibatch_kmeans(x, NUM_BLOBS, **RUN, init=init, callback=lambda step, m: logged.append((step, m)))
    assert np.unique(brute_force(x, centres)[0]).size == NUM_BLOBS  # all used
    assert [s for s, _ in logged] == [40]  # log_every=100 > num_steps: the last step is logged
    assert logged[0][1]["reassigned"] >= 3  # (one more is freed when the first duplicate moves to the batch mean)


def test_idle_centres_are_reseeded(data):
    x, means, _ = data
    # reassignment_ratio=0 turns the count rule off: a centre far from all data stays idle unless dead_after is set.
    init = np.concatenate([means[:-1], np.full((1, DIM), 1e3)]).astype(np.float32)
    options = {**RUN, "init": init, "reassignment_ratio": 0.0}
    stuck = minibatch_kmeans(x, NUM_BLOBS, **options)
    np.testing.assert_array_equal(stuck[-1], init[-1])
    moved = minibatch_kmeans(x, NUM_BLOBS, **options, dead_after=3)
    assert np.unique(brute_force(x, moved)[0]).size == NUM_BLOBS
    assert inertia(x, moved) < 0.5 * inertia(x, stuck)


def test_per_class_concatenates_in_sorted_class_order():
    x, _, which = blobs(num_blobs=6, per_blob=300, seed=4)
    names = np.array(["zebra", "ant", "moth"])
    labels = names[which // 2]  # two blobs per class; class order in the data is not sorted
    options = {"batch_size": 64, "num_steps": 30, "seed": 0, "num_devices": 1, "steps_per_call": 16, "init": "random"}
    centres, metadata = build_codebook(x, labels, mode="per_class", k_per_class=2, **options)
    assert centres.shape == (6, DIM)
    assert metadata["classes"] == ["ant", "moth", "zebra"] and metadata["num_codes"] == 6
    # Every code lies in its class's blobs (nearest data row of that class; blobs are 20 sigma apart).
    np.testing.assert_array_equal(labels[brute_force(centres, x)[0]], np.repeat(metadata["classes"], 2))
    # A class's result depends on (seed, class) only, not on which classes run together.
    grouped, _ = build_codebook(x, labels, mode="per_class", k_per_class=2, classes_per_run=1, **options)
    np.testing.assert_allclose(grouped, centres, rtol=1e-5, atol=1e-5)


def test_global_mode_is_minibatch_kmeans(data, reference):
    centres, metadata = build_codebook(data[0], mode="global", k_total=NUM_BLOBS, **RUN)
    np.testing.assert_array_equal(centres, reference)
    assert metadata["mode"] == "global" and metadata["k"] == NUM_BLOBS and metadata["steps"] == 40
    assert metadata["final_batch_inertia"] > 0


@pytest.mark.parametrize("method", ["random", "kmeans++", "kmeans||"])
def test_init_methods(data, method):
    x, _, which = data
    centres = minibatch_kmeans(x, NUM_BLOBS, **{**RUN, "num_steps": 0}, init=method)  # the init itself
    nearest_row = brute_force(centres, x)
    assert nearest_row[1].max() < 1e-6  # every initial centre is a data row
    if method != "random":  # k-means++ and k-means|| seed every well-separated blob once
        assert np.unique(which[nearest_row[0]]).size == NUM_BLOBS


def test_codebook_from_features(data):
    x, means, _ = data
    gaussian = codebook_from_features(x, 4000, "random", seed=0)
    np.testing.assert_allclose(gaussian.mean(0), x.mean(0), atol=0.05 * x.std(0).max())
    np.testing.assert_allclose(gaussian.std(0), x.std(0), rtol=0.05)
    selected = codebook_from_features(x, 50, "random_selection", seed=0)
    assert brute_force(selected, x)[1].max() == 0 and np.unique(selected, axis=0).shape[0] == 50
    kmeans = codebook_from_features(x, NUM_BLOBS, "kmeans", seed=0, **{k: v for k, v in RUN.items() if k != "seed"})
    assert matched_error(kmeans, means) < 0.2


def test_random_selection_picks_distinct_vectors():
    # 12 distinct vectors, the first repeated 200 times (flat or saturated patches repeat): the selection takes every
    # distinct vector once rather than repeats, and asking for more than exist is an error naming the count.
    distinct = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    x = np.repeat(distinct, [200] + [1] * 11, axis=0)
    selected = codebook_from_features(x, 12, "random_selection", seed=3)
    np.testing.assert_array_equal(np.unique(selected, axis=0), distinct)
    with pytest.raises(ValueError, match="hold only 12 distinct"):
        codebook_from_features(x, 13, "random_selection", seed=3)


def test_streamed_source_equals_in_memory(data, reference, tmp_path):
    x = data[0]
    paths = []
    for i, part in enumerate(np.array_split(x, [700, 1900])):
        paths.append(tmp_path / f"shard{i}.npy")
        np.save(paths[-1], part)
    source = NpyShards(paths)
    assert (source.num_rows, source.dim) == x.shape
    np.testing.assert_array_equal(source.read(np.array([2999, 0, 700, 699, 700])), x[[2999, 0, 700, 699, 700]])
    np.testing.assert_array_equal(minibatch_kmeans(source, NUM_BLOBS, **RUN), reference)
    np.save(tmp_path / "all.npy", x)
    memmap = np.load(tmp_path / "all.npy", mmap_mode="r")
    np.testing.assert_array_equal(minibatch_kmeans(memmap, NUM_BLOBS, **RUN), reference)
    assert inertia(source, reference, batch_size=1000) == pytest.approx(inertia(x, reference), rel=1e-6)


def test_errors_name_the_problem(data):
    x = data[0]
    with pytest.raises(ValueError, match="k=4000 > 3000 rows"):
        minibatch_kmeans(x, 4000, **RUN)
    with pytest.raises(ValueError, match=r"expected \(6, 8\)"):
        minibatch_kmeans(x, NUM_BLOBS, **RUN, init=np.zeros((NUM_BLOBS, 5), np.float32))
    with pytest.raises(ValueError, match="feature dim 8"):
        inertia(x, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="unknown codebook mode 'kmeans'"):
        build_codebook(x, mode="kmeans", k_total=4, **RUN)
    with pytest.raises(ValueError, match="labels and k_per_class"):
        build_codebook(x, mode="per_class", k_per_class=2, **RUN)
    with pytest.raises(ValueError, match=r"labels must have shape \(3000,\)"):
        build_codebook(x, np.zeros(10), mode="per_class", k_per_class=2, **RUN)
    with pytest.raises(ValueError, match="k_per_class=2 > 1 rows of class 7"):
        build_codebook(x, np.r_[np.zeros(2999), 7], mode="per_class", k_per_class=2, **RUN)
    with pytest.raises(ValueError, match="unknown k-means options"):
        minibatch_kmeans(x, 4, **RUN, chunksize=8)
    with pytest.raises(ValueError, match="unknown k-means init"):
        minibatch_kmeans(x, 4, **RUN, init="kmeans+")
    with pytest.raises(ValueError, match="init='array' needs the centres"):
        minibatch_kmeans(x, 4, **RUN, init="array")
    with pytest.raises(ValueError, match="unknown codebook method"):
        codebook_from_features(x, 4, "uniform")
    if jax.device_count() >= 8:
        with pytest.raises(ValueError, match="does not split over 8 devices"):
            minibatch_kmeans(x, 4, **{**RUN, "batch_size": 100, "num_devices": 8})


def test_save_codebook_is_loadable(data, reference, tmp_path):
    metadata = {"extractor": "clip-vit-l14", "pooling": "4x4 avg", "k": NUM_BLOBS, "final_inertia": np.float32(2.5)}
    path = save_codebook(tmp_path / "cb", reference, metadata)
    np.testing.assert_array_equal(load_codebook(path, expected_dim=DIM), reference)
    info = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    assert info["extractor"] == "clip-vit-l14" and info["final_inertia"] == 2.5
    assert (info["num_codes"], info["dim"]) == (NUM_BLOBS, DIM) and "date" in info and "sha256" in info
    assert sorted(p.name for p in (tmp_path / "cb").iterdir()) == ["codebook.json", "codebook.npy"]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_codebook(tmp_path / "bad", reference, {"when": object()})
    assert not (tmp_path / "bad" / "codebook.npy").exists()
