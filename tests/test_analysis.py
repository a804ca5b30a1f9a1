"""The analysis tools: usage curves and heat maps, t-SNE of the codebook, token replacement, sweeps (plumbing with a
fake trainer, and one real 2-step run of `configs/demo.py:smoke` whose tokenizer and counts then feed the CLI
tools: t-SNE and token replacement are tested on what the trainer produced)."""

import itertools
import json
import pathlib

import ml_collections
import numpy as np
import pytest
import threadpoolctl
from conftest import PROJECT_ROOT

from vqlc_jax.analysis import replacement, sweeps, tsne, usage
from vqlc_jax.analysis.__main__ import main as cli

SMOKE = str(PROJECT_ROOT / "configs" / "demo.py:smoke")
SWEEP_CONFIGS = ("codebook_size", "codebook_init", "projected_dim", "codebook_training")


@pytest.fixture(autouse=True, scope="module")
def one_openmp_thread():
    """scikit-learn's t-SNE runs OpenMP threads: on a busy machine, spinning them up costs seconds for 40 points.
    threadpoolctl limits the libraries already loaded, hence the import first."""
    import sklearn.manifold  # noqa: F401

    with threadpoolctl.threadpool_limits(1):
        yield


# ----------------------------------------------------------------------------------------------------------------------
# Usage curves and heat maps
# ----------------------------------------------------------------------------------------------------------------------
def write_metrics(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


FAKE_METRICS = [
    {"step": 2, "loss": 1.0, "window_utilization": 0.25, "window_perplexity": 3.0},
    {"step": 4, "epoch": 0, "utilization": 0.5, "perplexity": 10.0},
    {"step": 4, "loss": 0.9, "window_utilization": 0.5, "window_perplexity": 5.0},
    {"step": 8, "epoch": 1, "utilization": 0.7, "perplexity": 20.0},
    {"step": 8, "epoch": 1, "utilization": 0.75, "perplexity": 21.0},  # a resumed run repeats epoch 1: last wins
]


def test_curves_per_epoch_and_per_window(tmp_path):
    records = usage.read_metrics(write_metrics(tmp_path / "metrics.jsonl", FAKE_METRICS))
    epochs = usage.curve(records)
    np.testing.assert_array_equal(epochs.x, [1, 2])
    np.testing.assert_allclose(epochs.y, [0.5, 0.75])
    np.testing.assert_allclose(usage.curve(records, "perplexity").y, [10.0, 21.0])
    windows = usage.curve(records, per="window")
    np.testing.assert_array_equal(windows.x, [2, 4])
    np.testing.assert_allclose(windows.y, [0.25, 0.5])
    with pytest.raises(ValueError, match="per='day'"):
        usage.curve(records, per="day")


def test_bad_metrics_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        usage.read_metrics(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        usage.read_metrics(tmp_path / "nowhere" / "metrics.jsonl")


def test_frequency_grid_is_near_square_and_sorted_on_request():
    counts = np.array([0, 5, 0, 3, 2, 0, 0, 10, 0, 0])
    grid = usage.frequency_grid(counts)
    assert grid.shape == (3, 4)  # cols = ceil(sqrt(10)) = 4, rows = ceil(10 / 4) = 3
    np.testing.assert_allclose(grid.reshape(-1)[:10], counts / 20)
    assert np.isnan(grid.reshape(-1)[10:]).all()
    assert grid[1, 3] == 0.5  # code 7 at row 7 // 4, column 7 % 4
    ordered = usage.frequency_grid(counts, sort=True).reshape(-1)[:10]
    np.testing.assert_allclose(ordered, np.sort(counts)[::-1] / 20)
    assert usage.frequency_grid(np.ones(16)).shape == (4, 4)


def test_counts_file_checks_and_summary(tmp_path):
    np.save(tmp_path / "bad.npy", np.ones((2, 3)))
    np.save(tmp_path / "neg.npy", np.array([1, -1]))
    np.save(tmp_path / "ok.npy", np.array([0, 2, 2, 0]))
    with pytest.raises(ValueError, match=r"bad\.npy: expected per-code counts \[N\]"):
        usage.load_counts(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"neg\.npy: counts must be finite non-negative"):
        usage.load_counts(tmp_path / "neg.npy")
    with pytest.raises(ValueError, match=r"ok\.npy: 4 counts, but the codebook has 8 codes"):
        usage.load_counts(tmp_path / "ok.npy", 8)
    summary = usage.usage_summary(usage.load_counts(tmp_path / "ok.npy"))
    assert summary == {"num_codes": 4, "used_codes": 2, "tokens": 4, "utilization": 0.5,
                       "perplexity": pytest.approx(2.0)}


def test_cli_curve_and_heatmap_write_png_json_and_markdown(tmp_path):
    run = tmp_path / "lc"
    run.mkdir()
    write_metrics(run / "metrics.jsonl", FAKE_METRICS)
    np.save(tmp_path / "counts.npy", np.arange(10))
    np.save(run / "epoch_code_counts.npy", np.arange(10))  # the run has N = 10 codes
    sweep_report = tmp_path / "utilization_sweep.json"
    sweep_report.write_text(json.dumps({"codebooks": [
        {"num_codes": n, "ceiling": {"splits": {"epoch": {"ceiling": c}}}} for n, c in ((10, 0.8), (20, 0.5))]}))
    cli(["curve", "--run", f"LC={run}", "--run", str(run), "--ceiling", "0.9", "--ceiling", "paper=1",
         "--ceiling-from", str(sweep_report), "--output", str(tmp_path / "out")])
    cli(["heatmap", "--counts", str(tmp_path / "counts.npy"), "--sort", "--output", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "utilization_per_epoch.json").read_text())
    assert list(data["runs"]) == ["LC", "lc"] and data["runs"]["LC"]["y"] == [0.5, 0.75]
    assert data["ceilings"] == {"ceiling": 0.9, "paper": 1.0, "ceiling N=10": 0.8}
    assert "| 2 | 75 | 75 |\n\nceiling: 90.0%" in (tmp_path / "out" / "utilization_per_epoch.md").read_text()
    heatmap = json.loads((tmp_path / "out" / "heatmap.json").read_text())
    assert heatmap["grid_shape"] == [3, 4] and heatmap["used_codes"] == 9 and heatmap["sorted"]
    for name in ("utilization_per_epoch.png", "heatmap.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_curve_ceilings_from_sweep_reports_and_mistakes(tmp_path):
    from vqlc_jax.analysis.ceiling import report_ceilings

    runs = {"LC": ("lc-16384", 16384), "EMA": ("ema-16384", 16384)}
    sweep_json = {"rows": [{"run": "lc-16384", "ceiling_epoch": 0.7}, {"run": "vq", "ceiling_epoch": 0.6},
                           {"run": "ema-16384"}]}
    assert report_ceilings(sweep_json, runs) == {"ceiling lc-16384": 0.7}
    with pytest.raises(ValueError, match="no training-epoch ceiling for the runs"):
        report_ceilings({"codebooks": [{"num_codes": 1024, "ceiling": {}}]}, runs)
    with pytest.raises(ValueError, match="not a sweep report"):
        report_ceilings({"name": "x"}, runs)
    run = tmp_path / "lc"
    run.mkdir()
    write_metrics(run / "metrics.jsonl", FAKE_METRICS)
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match=r"--ceiling-from .*other\.json: the sweep report has no"):
        cli(["curve", "--run", str(run), "--ceiling-from", str(tmp_path / "other.json"), "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="use them with --metric utilization"):
        cli(["curve", "--run", str(run), "--metric", "perplexity", "--ceiling", "0.5", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: a share in [0, 1]
        cli(["curve", "--run", str(run), "--ceiling", "90", "--output", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------------------
# t-SNE and the neighbour search (the tokenizer-level tools run on the real run's tokenizer at the end)
# ----------------------------------------------------------------------------------------------------------------------
def test_tsne_marks_active_codes_of_a_seeded_sample():
    codebook = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    counts = np.zeros(64, np.int64)
    counts[::3] = 5
    result = tsne.tsne_codes(codebook, counts, sample=40, seed=1)
    assert result.points.shape == (40, 2) and np.isfinite(result.points).all()
    assert np.unique(result.indices).size == 40 and (np.diff(result.indices) > 0).all()
    np.testing.assert_array_equal(result.active, result.indices % 3 == 0)
    again = tsne.tsne_codes(codebook, counts, sample=40, seed=1)
    np.testing.assert_array_equal(again.indices, result.indices)
    np.testing.assert_allclose(again.points, result.points)
    assert result.summary(64) == {"num_codes": 64, "sampled": 40, "sampled_active": int(result.active.sum()),
                                  "sampled_inactive": int((~result.active).sum())}
    with pytest.raises(ValueError, match=r"codebook \(64, 4\) and counts \(63,\)"):
        tsne.tsne_codes(codebook, counts[:63])


def test_nearest_other_codes_match_a_full_sort():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((300, 4)).astype(np.float32)
    codebook[7] = codebook[3]  # a duplicate: distance 0 to code 3, but never code 3 itself
    codebook[11] = codebook[5] + 1e-3
    codebook[12] = codebook[5] - 1e-3  # not exactly equidistant from 5 in float32: the sort below decides
    queries = np.array([3, 7, 0, 299, 150, 5])
    indices, distances = replacement.nearest_other_codes(codebook, queries, 20, chunk_size=37, query_batch=4)
    full = ((codebook[queries][:, None] - codebook[None]) ** 2).sum(-1)
    full[np.arange(len(queries)), queries] = np.inf
    expected = np.lexsort((np.broadcast_to(np.arange(300), full.shape), full), axis=1)[:, :20]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, np.take_along_axis(full, expected, 1), atol=1e-5)
    assert indices[0, 0] == 7 and indices[1, 0] == 3
    with pytest.raises(ValueError, match=r"k=300 must lie in \[1, 299\]"):
        replacement.nearest_other_codes(codebook, queries, 300)


def test_rank_table_puts_each_code_first():
    codebook = np.arange(10, dtype=np.float32)[:, None] ** 2  # codes at 0, 1, 4, 9, ...: nearest of 2 is 1, then 0
    table = replacement.rank_table(codebook, np.array([2, 9]), [1, 2, 3, 10], chunk_size=4)
    np.testing.assert_array_equal(table, [[2, 1, 0, 9], [9, 8, 7, 0]])
    with pytest.raises(ValueError, match=r"ranks \[1, 11\] must be non-empty and lie in \[1, 10\]"):
        replacement.rank_table(codebook, np.array([2]), [1, 11])


# ----------------------------------------------------------------------------------------------------------------------
# Sweeps: names, overrides, planning, collection
# ----------------------------------------------------------------------------------------------------------------------
def make_sweep(runs, codebook_base=""):
    return ml_collections.ConfigDict(dict(name="test sweep", base=SMOKE, codebook_base=codebook_base, runs=runs))


def test_run_names_are_derived_from_the_overrides():
    assert sweeps.run_name({"model.quantizer.num_codes": 256, "model.embed_dim": 8}) == "num_codes=256-embed_dim=8"
    assert sweeps.run_name({"codebook.method": "random selection/x"}) == "method=random_selection_x"
    assert sweeps.run_name({}) == "base"
    with pytest.raises(ValueError, match="'model.quantizer' has a non-scalar value: give the run a name"):
        sweeps.run_name({"model.quantizer": {"name": "vq"}})


def test_plan_merges_overrides_and_checks_runs():
    sweep = make_sweep([dict(overrides={"model.embed_dim": 8}), dict(name="b", overrides={"seed": 3},
                                                                      codebook={"codebook.k": 4})],
                       codebook_base="configs/codebook/demo.py")
    first, second = sweeps.plan(sweep, overrides={"seed": 2, "total_steps": 5},
                                codebook_overrides={"kmeans.num_steps": 1})
    assert first.name == "embed_dim=8" and first.swept == {"model.embed_dim": 8} and first.codebook is None
    assert first.overrides == {"model.embed_dim": 8, "seed": 2, "total_steps": 5}
    assert second.overrides == {"seed": 2, "total_steps": 5} and second.swept == {"seed": 3}
    assert second.codebook == {"codebook.k": 4, "kmeans.num_steps": 1} and second.codebook_swept == {"codebook.k": 4}
    with pytest.raises(ValueError, match=r"duplicate run names \['x'\]"):
        sweeps.plan(make_sweep([dict(name="x"), dict(name="x")]))
    with pytest.raises(ValueError, match=r"run 0: unknown entries \['overide'\]"):
        sweeps.plan(make_sweep([dict(overide={})]))
    with pytest.raises(ValueError, match="run 0: name 'a/b' is not a plain folder name"):
        sweeps.plan(make_sweep([dict(name="a/b")]))
    with pytest.raises(ValueError, match="run 0: builds a codebook, but the sweep has no codebook_base"):
        sweeps.plan(make_sweep([dict(codebook={})]))


def test_cli_key_values_are_python_literals_or_strings():
    assert sweeps.parse_key_value("total_steps=2") == ("total_steps", 2)
    assert sweeps.parse_key_value("codebook_path=/a/b.npy") == ("codebook_path", "/a/b.npy")
    assert sweeps.parse_key_value("model.ddconfig.ch_mult=(1, 2)") == ("model.ddconfig.ch_mult", (1, 2))
    with pytest.raises(Exception, match="expected KEY=VALUE, got 'total_steps'"):
        sweeps.parse_key_value("total_steps")


def test_overrides_set_nested_keys_and_name_mistakes():
    base = sweeps.load_config_file(SMOKE)
    config = sweeps.apply_overrides(base, {"model.quantizer.num_codes": 32, "optimizer.lr": 1,
                                           "data.options.resolution": 8}, source="sweep.py")
    assert config.model.quantizer.num_codes == 32 and config.optimizer.lr == 1.0 and config.data.options.resolution == 8
    assert base.model.quantizer.num_codes == 64  # the base is left alone
    replaced = sweeps.apply_overrides(base, {"model.quantizer": {"name": "vq", "num_codes": 16}}, source="s")
    assert replaced.model.quantizer.to_dict() == {"name": "vq", "num_codes": 16}
    with pytest.raises(ValueError, match=r"sweep\.py: unknown key 'model\.quantizr\.x' \(model has: ddconfig, "):
        sweeps.apply_overrides(base, {"model.quantizr.x": 1}, source="sweep.py")
    with pytest.raises(ValueError, match=r"sweep\.py: total_steps='many'"):
        sweeps.apply_overrides(base, {"total_steps": "many"}, source="sweep.py")
    with pytest.raises(FileNotFoundError, match=r"config file .*nothere\.py not found"):
        sweeps.load_config_file("nothere.py:smoke")


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
@pytest.mark.parametrize("variant", ["demo", "imagenet"])
def test_sweep_configs_apply_to_their_bases(name, variant):
    from vqlc_jax.codebook import build
    from vqlc_jax.train import config as config_lib

    sweep = sweeps.load_config_file(PROJECT_ROOT / "configs" / "sweeps" / f"{name}.py:{variant}")
    base = sweeps.load_config_file(sweeps.resolve(sweep.base))
    runs = sweeps.plan(sweep)
    assert len(runs) >= 2
    for run in runs:
        overrides = dict(run.overrides)
        if run.codebook is not None:
            codebook = sweeps.load_config_file(sweeps.resolve(sweep.codebook_base))
            build.validate(sweeps.apply_overrides(codebook, run.codebook, source=run.name))
            overrides.update(codebook_path="codebook.npy", codebook_init="file")
        config_lib.validate(sweeps.apply_overrides(base, overrides, source=run.name))


def test_run_sweep_builds_codebooks_once_trains_and_collects(tmp_path):
    calls = {"train": [], "build": []}
    status = {"vq": "done"}

    def fake_build(config, directory, stage):
        calls["build"].append((stage, config.codebook.k, directory.name))
        if stage == "extract":
            (directory / "features").mkdir(parents=True, exist_ok=True)
        else:
            assert (directory / "features").resolve() == (codebooks / features / "features").resolve()
            np.save(directory / "codebook.npy", np.zeros((config.codebook.k, 48), np.float32))
            np.save(directory / "cell_counts.npy", np.arange(1, config.codebook.k + 1))  # cells of 1..k rows

    def fake_train(config, workdir):
        calls["train"].append((workdir.name, config.model.quantizer.num_codes, config.codebook_path))
        return {"status": status.get(workdir.name, "done"), "step": 2, "loss": 1.0, "eval/psnr": 20.0,
                "eval/utilization": config.model.quantizer.num_codes / 100, "eval/ssim": 0.5}

    codebooks = tmp_path / "codebooks"
    # Codebooks that differ in k (clustering) only share the base config's features.
    features = sweeps.features_dir(tmp_path, sweeps.load_config_file(sweeps.resolve("configs/codebook/demo.py"))).name
    sweep = make_sweep([dict(overrides={"model.quantizer.num_codes": 16}, codebook={"codebook.k": 16}),
                        dict(name="again16", overrides={"model.quantizer.num_codes": 16}, codebook={"codebook.k": 16}),
                        dict(name="k8", overrides={"model.quantizer.num_codes": 8}, codebook={"codebook.k": 8}),
                        dict(name="vq", overrides={"model.quantizer": {"name": "vq", "num_codes": 8}})],
                       codebook_base="configs/codebook/demo.py")
    rows = sweeps.run_sweep(sweep, tmp_path, overrides={"total_steps": 2}, train_fn=fake_train, build_fn=fake_build)
    assert [(stage, k) for stage, k, _ in calls["build"]] == [("extract", 16), ("cluster", 16), ("extract", 8),
                                                              ("cluster", 8)]  # no build for "again16"
    assert calls["build"][0][2] == calls["build"][2][2] == features
    k16, k8 = (codebooks / calls["build"][i][2] / "codebook.npy" for i in (1, 3))
    assert k16.parent.name.startswith("k=16-") and k8.parent.name.startswith("k=8-")
    assert calls["train"] == [("num_codes=16", 16, str(k16)), ("again16", 16, str(k16)), ("k8", 8, str(k8)),
                              ("vq", 8, "")]
    # The ceiling of the run's codebook (its cells as the build left them) for the smoke config's validation split
    # (16 images x 8 x 8 tokens) and training epoch (full batches of 8 images).
    from vqlc_jax.data import make_source

    p = np.arange(1, 17) / np.arange(1, 17).sum()
    epoch_tokens = len(make_source("bundled", "train", {"resolution": 16})) // 8 * 8 * 64
    want = {t: np.mean(1 - (1 - p) ** t) for t in (16 * 64, epoch_tokens)}
    assert rows[0] == {"run": "num_codes=16", "model.quantizer.num_codes": 16, "codebook:codebook.k": 16,
                       "status": "done", "step": 2, "utilization": 0.16, "psnr": 20.0, "ssim": 0.5,
                       "ceiling_val": pytest.approx(want[1024]), "ceiling_epoch": pytest.approx(want[epoch_tokens]),
                       "util_per_ceiling": pytest.approx(0.16 / want[1024])}
    assert "ceiling_val" not in rows[3]  # vq: no codebook of its own
    result = json.loads((tmp_path / "vq" / sweeps.RESULT_FILE).read_text())
    assert result["overrides"] == {"model.quantizer": {"name": "vq", "num_codes": 8}, "total_steps": 2}
    table = sweeps.sweep_markdown("test sweep", rows)
    assert ("| run | model.quantizer.num_codes | codebook:codebook.k | status | utilization % | val ceiling % | "
            "util / ceiling | epoch ceiling % | perplexity |") in table
    assert (f"| num_codes=16 | 16 | 16 | done | 16 | {100 * want[1024]:.4g} | {0.16 / want[1024]:.4g} | "
            f"{100 * want[epoch_tokens]:.4g} | n/a | 20 | n/a | 0.5 | n/a | n/a |") in table
    assert "| vq | n/a | n/a | done | 8 | n/a | n/a | n/a |" in table

    # Finished runs are skipped; a run without results is missing; a preempted run stops the sweep and is resumed.
    (tmp_path / "vq" / sweeps.RESULT_FILE).unlink()
    rows = sweeps.collect(sweeps.plan(sweep), tmp_path)
    assert rows[3] == {"run": "vq", "model.quantizer": {"name": "vq", "num_codes": 8}, "status": "missing"}
    assert "| vq | n/a | n/a | missing | n/a |" in sweeps.sweep_markdown("test sweep", rows)
    status["vq"] = "preempted"
    assert sweeps.run_sweep(sweep, tmp_path, train_fn=fake_train, build_fn=fake_build)[3]["status"] == "preempted"
    status["vq"] = "done"
    assert sweeps.run_sweep(sweep, tmp_path, train_fn=fake_train, build_fn=fake_build)[3]["status"] == "done"
    assert [name for name, _, _ in calls["train"][4:]] == ["vq", "vq"] and len(calls["build"]) == 4


# ----------------------------------------------------------------------------------------------------------------------
# One real run: a 2-step sweep of the smoke config; the CLI tools then run on what it wrote
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The workdir of a real 1-run sweep (`configs/demo.py:smoke` with 32 codes, 2 steps), run through the CLI."""
    tmp = tmp_path_factory.mktemp("real_sweep")
    sweep_file = tmp / "tiny_sweep.py"
    sweep_file.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        f"    return ml_collections.ConfigDict(dict(name='tiny', base={SMOKE!r}, codebook_base='',\n"
        "        runs=[dict(name='lc', overrides={'model.quantizer.num_codes': 32})]))\n")
    steps = ["total_steps=2", "log_every_steps=2", "checkpoint_every_steps=2", "eval_every_steps=2",
             "optimizer.warmup_steps=1"]
    cli(["sweep", "--config", str(sweep_file), "--workdir", str(tmp / "sweep"), *(f"--set={s}" for s in steps)])
    return tmp / "sweep"


def test_real_sweep_trains_with_the_overrides_and_tabulates(trained):
    (row,) = json.loads((trained / "sweep.json").read_text())["rows"]
    assert row["status"] == "done" and row["step"] == 2 and 0 < row["utilization"] <= 1 and np.isfinite(row["psnr"])
    assert "| lc | 32 | done |" in (trained / "sweep.md").read_text()
    assert (trained / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((trained / "lc" / "tokenizer" / "tokenizer.json").read_text())["quantizer"]["num_codes"] == 32


def test_cli_curve_and_tsne_on_the_real_run(trained, tmp_path):
    run = trained / "lc"
    cli(["curve", "--run", str(run), "--per", "window", "--output", str(tmp_path)])
    assert json.loads((tmp_path / "utilization_per_window.json").read_text())["runs"]["lc"]["x"] == [2]
    cli(["tsne", "--tokenizer", str(run / "tokenizer"), "--counts", str(run / "eval_code_counts.npy"),
         "--output", str(tmp_path)])
    data = json.loads((tmp_path / "tsne.json").read_text())
    counts = np.load(run / "eval_code_counts.npy")
    assert data["sampled"] == 32 and data["sampled_active"] == np.count_nonzero(counts)
    np.testing.assert_array_equal(data["active"], counts[data["indices"]] > 0)
    for name in ("utilization_per_window.png", "tsne.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_replacement_on_the_real_run(trained, tmp_path):
    """On the images the trainer evaluated (smoke data: 16 validation crops at 16 px, batches of 8)."""
    eval_config = tmp_path / "eval_smoke.py"
    eval_config.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    return ml_collections.ConfigDict(dict(batch_size=8, data=dict(name='bundled', eval_split='validation',\n"
        "        options={'resolution': 16}, resolution=16, eval_max_images=16)))\n")
    ranks = [1, 2, 4, 8, 16, 32]
    cli(["replace", "--tokenizer", str(trained / "lc" / "tokenizer"), "--config", str(eval_config),
         "--ranks", ",".join(map(str, ranks)), "--chunk-size", "8", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "replacement.json").read_text())["rows"]
    assert [row["rank"] for row in rows] == ranks
    assert (tmp_path / "replacement.png").read_bytes()[:4] == b"\x89PNG"
    # M = 1 decodes the very tokens: nothing moves, and the PSNR is the trainer's own evaluation of these images
    # (which decodes the straight-through latents z + (code - z): equal to the code up to rounding).
    evaluation = json.loads((trained / "lc" / sweeps.RESULT_FILE).read_text())["result"]
    assert rows[0]["mse_to_reconstruction"] == 0 and rows[0]["code_distance"] == 0
    assert rows[0]["psnr"] == pytest.approx(evaluation["eval/psnr"], abs=1e-3)
    assert rows[0]["ssim"] == pytest.approx(evaluation["eval/ssim"], abs=1e-4)
    # Farther codes: the code distance never shrinks (by construction) and the decoded images drift away from the
    # plain reconstruction as M grows. A 2-step decoder's output barely depends on its input, so PSNR against the
    # originals has no trend yet: the drift is measured against the M = 1 reconstruction.
    distance = [row["code_distance"] for row in rows]
    assert all(a <= b for a, b in itertools.pairwise(distance)) and distance[-1] > distance[1]
    mse = np.array([row["mse_to_reconstruction"] for row in rows])
    assert (mse[1:] > 0).all() and mse[-1] == mse.max()
    spearman = np.corrcoef(np.arange(len(ranks)), np.argsort(np.argsort(mse)))[0, 1]
    assert spearman > 0.8, mse
