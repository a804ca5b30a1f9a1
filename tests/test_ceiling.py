"""The feature-distribution utilization ceiling (`vqlc_jax.analysis.ceiling`): the formula against an exact count
of every draw sequence, the streamed cell counts against a brute-force argmin, the `ceiling` CLI on real extracted
shards, and the utilization sweep (`benchmarks/utilization_sweep.py --quick`) reporting it, interrupted and resumed."""

import fractions
import importlib.util
import itertools
import json

import ml_collections
import numpy as np
import pytest
from conftest import PROJECT_ROOT

from vqlc_jax.analysis import ceiling
from vqlc_jax.analysis.__main__ import main as cli
from vqlc_jax.codebook.kmeans_data import NpyShards


# ----------------------------------------------------------------------------------------------------------------------
# The formula
# ----------------------------------------------------------------------------------------------------------------------
def test_ceiling_is_the_mean_share_of_codes_hit_over_every_draw_sequence():
    counts = np.array([3, 1, 0, 2, 1])  # cell of each of R = 7 rows: 0 0 0 1 3 3 4
    cell_of_row = np.repeat(np.arange(5), counts)
    for tokens in range(5):
        hit = [len(set(cell_of_row[list(draws)])) / 5 for draws in itertools.product(range(7), repeat=tokens)]
        assert ceiling.ceiling(counts, tokens) == pytest.approx(np.mean(hit), abs=1e-14), tokens
    np.testing.assert_allclose(ceiling.ceiling(counts, [[1, 2], [3, 4]]).shape, (2, 2))
    assert ceiling.ceiling(counts, 10**15) == 4 / 5  # every non-empty cell, never the empty one
    assert ceiling.ceiling([5], 3) == 1.0 and ceiling.ceiling([5], 0) == 0.0


def test_ceiling_is_exact_for_tiny_cells_and_equals_uniform_for_equal_cells():
    big = 10**15
    want = fractions.Fraction(0)
    for n in (1, big):
        want += 1 - (1 - fractions.Fraction(n, big + 1)) ** 10
    assert ceiling.ceiling([1, big], 10) == pytest.approx(float(want / 2), rel=1e-12)
    # Equal cells: T draws hit code i with 1 - (1 - 1/N)^T, which tends to uniform's 1 - exp(-T/N) for large N.
    tokens = np.array([0, 10, 1_000, 87_040])
    np.testing.assert_allclose(ceiling.ceiling(np.full(16_384, 7), tokens), 1 - (1 - 1 / 16_384) ** tokens,
                               rtol=1e-12)
    np.testing.assert_allclose(ceiling.uniform(16_384, tokens), 1 - np.exp(-tokens / 16_384), rtol=1e-12)


def test_ceiling_names_bad_input():
    with pytest.raises(ValueError, match=r"expected per-code counts \[N\], got shape \(2, 2\)"):
        ceiling.ceiling(np.ones((2, 2)), 3)
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        ceiling.ceiling([0, 0], 3)
    with pytest.raises(ValueError, match="tokens must be finite and >= 0"):
        ceiling.ceiling([1, 2], -1)
    with pytest.raises(ValueError, match="cells \\(3,\\) and used \\(2,\\) differ"):
        ceiling.coverage_by_cell_size([1, 2, 3], [1, 0])


def test_coverage_by_cell_size_groups_codes_by_their_cells():
    cells = np.array([0, 0, 1, 3, 3, 60, 200])
    used = np.array([5, 0, 0, 1, 0, 9, 4])
    rows = ceiling.coverage_by_cell_size(cells, used, tokens=100, edges=(0, 1, 2, 50))
    assert [r["cell_rows"] for r in rows] == ["0", "1", "2-49", ">= 50"]
    assert [r["codes"] for r in rows] == [2, 1, 2, 2]
    assert [r["used"] for r in rows] == [0.5, 0.0, 0.5, 1.0]
    assert rows[0]["expected_hit"] == 0 and rows[0]["row_share"] == 0
    assert rows[2]["expected_hit"] == pytest.approx(1 - (1 - 3 / 267) ** 100)
    assert rows[3]["row_share"] == pytest.approx(260 / 267)


# ----------------------------------------------------------------------------------------------------------------------
# Cell counts
# ----------------------------------------------------------------------------------------------------------------------
def test_cell_counts_stream_shards_and_match_a_brute_force_argmin(tmp_path):
    """Small integers: every score is exact in float32, so ties (duplicate and equidistant codes) are real ties and
    both sides give them to the lowest index."""
    rng = np.random.default_rng(0)
    features = rng.integers(-3, 4, (1_000, 6)).astype(np.float16)
    codebook = rng.integers(-3, 4, (37, 6)).astype(np.float32)
    codebook[20] = codebook[4]  # a duplicate: its cell is empty
    codebook[30] = features[0]
    paths = []
    for i, part in enumerate((features[:700], features[700:])):
        paths.append(tmp_path / f"shard{i}.npy")
        np.save(paths[-1], part)
    distances = ((features[:, None, :].astype(np.int64) - codebook[None].astype(np.int64)) ** 2).sum(-1)
    want = np.bincount(distances.argmin(1), minlength=37)
    got = ceiling.cell_counts(codebook, NpyShards(paths), rows_per_block=96, chunk_size=8, row_chunk=16)
    np.testing.assert_array_equal(got, want)
    assert got[20] == 0 and got[30] > 0 and got.dtype == np.int64
    np.testing.assert_array_equal(ceiling.cell_counts(codebook, features.astype(np.float32)), want)
    with pytest.raises(ValueError, match=r"codebook \(37, 5\) does not match features of dim 6"):
        ceiling.cell_counts(codebook[:, :5], features)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """A real feature extraction (bundled train split, 8 images at 16 px, 4x4 pixel patches: 128 rows of 48-d) and
    a 24-code codebook of distinct rows with two duplicates, as `vqlc_jax.codebook.build` lays them out."""
    from vqlc_jax.codebook import build, extract

    directory = tmp_path_factory.mktemp("codebook")
    config = build.base_config()
    config.data.update(name="bundled", options={"resolution": 16}, resolution=16, max_images=8)
    config.extractor.update(name="pixels", pool=1)
    config.extract.update(global_batch_size=8, images_per_shard=8, num_devices=1)
    build.build(config, directory, "extract")
    shards, _, _ = extract.open_features(directory / extract.FEATURES_DIR)
    rows = np.unique(np.asarray(shards.read(np.arange(shards.num_rows)), np.float32), axis=0)
    codebook = rows[np.random.default_rng(0).choice(len(rows), 24, replace=False)]
    codebook[[5, 17]] = codebook[[2, 9]]
    np.save(directory / "codebook.npy", codebook)
    return directory


def test_directory_cell_counts_are_kept_beside_the_codebook(build_dir, monkeypatch):
    from vqlc_jax.codebook import extract

    shards, _, _ = extract.open_features(build_dir / extract.FEATURES_DIR)
    rows = np.asarray(shards.read(np.arange(shards.num_rows)), np.float64)
    codebook = np.load(build_dir / "codebook.npy").astype(np.float64)
    want = np.bincount(((rows[:, None] - codebook[None]) ** 2).sum(-1).argmin(1), minlength=24)
    np.testing.assert_array_equal(ceiling.directory_cell_counts(build_dir), want)
    assert want.sum() == 128 and want[5] == want[17] == 0
    monkeypatch.setattr(ceiling, "cell_counts", lambda *a, **k: pytest.fail("recounted"))
    np.testing.assert_array_equal(ceiling.directory_cell_counts(build_dir), want)


def test_cli_ceiling_on_extracted_shards(build_dir, tmp_path):
    cells = ceiling.directory_cell_counts(build_dir)
    used = (cells > 2).astype(np.int64) * 3
    np.save(tmp_path / "counts.npy", used)
    cli(["ceiling", "--codebook", str(build_dir / "codebook.npy"), "--features", str(build_dir), "--tokens", "64",
         "1000000", "--counts", str(tmp_path / "counts.npy"), "--rows-per-block", "50", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "ceiling.json").read_text())
    assert data["num_codes"] == 24 and data["rows"] == 128 and data["duplicate_codes"] == 2
    assert data["nonempty_cells"] == np.count_nonzero(cells)
    splits = data["splits"]
    assert list(splits) == ["T=64", "T=1,000,000", f"counts.npy (T={used.sum()})"]
    assert splits["T=64"]["ceiling"] == pytest.approx(ceiling.ceiling(cells, 64))
    assert splits["T=1,000,000"]["ceiling"] == pytest.approx(np.count_nonzero(cells) / 24)
    assert splits["T=64"]["uniform"] == pytest.approx(1 - np.exp(-64 / 24))
    assert data["utilization"] == np.mean(used > 0)
    assert data["util_per_ceiling"] == pytest.approx(np.mean(used > 0) / ceiling.ceiling(cells, used.sum()))
    assert sum(r["codes"] for r in data["by_cell_size"]) == 24
    np.testing.assert_array_equal(np.load(tmp_path / "cell_counts.npy"), cells)
    assert "| T=64 | 64 |" in (tmp_path / "ceiling.md").read_text()
    assert (tmp_path / "ceiling.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="give --tokens"):
        cli(["ceiling", "--codebook", str(build_dir / "codebook.npy"), "--features", str(build_dir),
             "--output", str(tmp_path)])


def test_split_tokens_of_a_trainer_config():
    from vqlc_jax import data as data_lib

    config = ml_collections.ConfigDict(dict(
        global_batch_size=16, model=dict(ddconfig=dict(ch_mult=(1, 2, 2))),
        data=dict(name="bundled", options={"resolution": 32}, resolution=32, eval_split="validation",
                  eval_max_images=0)))
    train = len(data_lib.make_source("bundled", "train", {"resolution": 32}))
    val = len(data_lib.make_source("bundled", "validation", {"resolution": 32}))
    assert ceiling.split_tokens(config) == {"epoch": train // 16 * 16 * 64, "val": val * 64}
    config.data.eval_max_images = 10
    assert ceiling.split_tokens(config)["val"] == 640


# ----------------------------------------------------------------------------------------------------------------------
# The utilization sweep: ceilings in its report; SIGTERM, then resume
# ----------------------------------------------------------------------------------------------------------------------
class Preempt:
    """Stands in for SIGTERM: `requested` turns True at its `stop`-th read (never when None); counts the reads."""

    def __init__(self, stop: int | None = None):
        self.stop, self.calls = stop, 0

    @property
    def requested(self) -> bool:
        self.calls += 1
        return self.stop is not None and self.calls >= self.stop

    def restore(self):
        pass


@pytest.fixture(scope="module")
def sweep_script():
    spec = importlib.util.spec_from_file_location("utilization_sweep", PROJECT_ROOT / "benchmarks" /
                                                  "utilization_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two real trainer runs, compilation dominating: 61 s on 2 cores at load ~5, 142 s at load ~7
def test_interrupted_sweep_names_the_run_and_resumes_it(sweep_script, tmp_path, capsys):
    args = ["--quick", "--methods", "lc", "--steps", "4", "--workdir", str(tmp_path)]
    run = tmp_path / "runs" / "lc-256"
    # Read once before the run, then after each step: the 3rd read stops the run after step 2.
    report = sweep_script.main(args, preemption=Preempt(stop=3))
    assert report["runs"] == [] and report["interrupted"]["run"] == "lc-256"
    assert report["interrupted"]["checkpoint_step"] == 2 and not (run / "eval_code_counts.npy").exists()
    out = capsys.readouterr().out
    assert f"Interrupted: run lc-256 stopped at step 2 (checkpoint kept) in {run}" in out
    assert "Interrupted: run lc-256" in (tmp_path / "utilization_sweep.md").read_text()
    codebook_time = (tmp_path / "codebooks" / "n256" / "codebook.npy").stat().st_mtime_ns

    resumed = Preempt()
    report = sweep_script.main(args, preemption=resumed)
    assert resumed.calls == 1 + 2  # the check before the run, then steps 3 and 4 only: resumed, not restarted
    (row,) = report["runs"]
    assert "interrupted" not in report and row["status"] == "done" and row["steps"] == 4
    assert (tmp_path / "codebooks" / "n256" / "codebook.npy").stat().st_mtime_ns == codebook_time

    # The ceilings: the codebook's cells over its build features, for the tokens the run really counted.
    (info,) = report["codebooks"]
    cells = np.load(tmp_path / "codebooks" / "n256" / "cell_counts.npy")
    assert cells.sum() == info["feature_rows"] == 64 * 16
    val = info["ceiling"]["splits"]["val"]
    assert val["tokens"] == np.load(run / "eval_code_counts.npy").sum() == 32 * 64
    assert val["ceiling"] == pytest.approx(ceiling.ceiling(cells, 32 * 64))
    table = (tmp_path / "utilization_sweep.md").read_text()
    util = row["val"]["utilization"]
    assert f"| lc | 256 | {100 * util:.1f} | {100 * val['ceiling']:.1f} (" in table
    assert f" | {util / val['ceiling']:.3f} | " in table

    again = Preempt()
    assert sweep_script.main(args, preemption=again)["runs"] == [row] and again.calls == 1  # finished: skipped
