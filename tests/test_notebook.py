"""`notebooks/quickstart.ipynb` in its short form: the parameter cell's values replaced by tiny ones (papermill's
way: an injected cell right after the cell tagged `parameters`), the code cells run in order as one script in a
fresh process, and what each step must leave behind checked.

The short form is the configs' `:smoke` models at 16 px, 64 codes, 20 tokenizer and 20 GPT steps, on one CPU device
with XLA's backend optimisation off (compilation dominates a run this short); no network. 55 s of CPU time; 156 s
of wall time on this project's 2-core machine while other jobs kept its load average near 11.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
SHORT = dict(VARIANT="smoke", IMAGE_SIZE=16, CODEBOOK_SIZE=64, KMEANS_STEPS=10, TOKENIZER_STEPS=20, GAN_START=20,
             GPT_STEPS=20, SAMPLES_PER_CLASS=2)
NUM_PHOTOS = 8  # classes of the bundled dataset


def read_notebook() -> dict:
    try:
        import nbformat
    except ImportError:
        return json.loads(NOTEBOOK.read_text())
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    return notebook


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def parameter_cell(notebook: dict) -> int:
    tagged = [i for i, c in enumerate(notebook["cells"]) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def script(notebook: dict, parameters: dict) -> str:
    """The notebook's code cells in order, `parameters` assigned right after the parameter cell."""
    injected = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    parts, parameters_at = [], parameter_cell(notebook)
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            parts.append(source(cell))
            if i == parameters_at:
                parts.append("# injected by tests/test_notebook.py\n" + injected)
    return "\n\n".join(parts) + "\n"


def test_notebook_is_clean_and_plain_python():
    notebook = read_notebook()
    assert notebook["nbformat"] == 4
    cells = notebook["cells"]
    assert cells[0]["cell_type"] == "markdown" and source(cells[0]).startswith("# ")
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i}: outputs not cleared"
        assert cells[i - 1]["cell_type"] == "markdown", f"cell {i}: no Markdown heading above it"
        text = source(cell)
        ast.parse(text)  # plain Python: no %magics or !shell lines
    install = source(next(c for c in cells if c["cell_type"] == "code"))
    assert '"google.colab" in sys.modules' in install and "REPO_URL = " in install
    # Every value the short form sets is a parameter of the notebook, set in its parameter cell.
    tree = ast.parse(source(cells[parameter_cell(notebook)]))
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    assert set(SHORT) | {"WORKDIR"} <= assigned
    assert len(NOTEBOOK.read_bytes()) < 30_000  # no embedded images


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart") / "w"
    path = workdir.parent / "quickstart.py"
    path.write_text(script(read_notebook(), {**SHORT, "WORKDIR": str(workdir)}))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one device (not conftest's 8); faster compiles
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"the notebook failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(f"\nnotebook short form: {seconds:.1f} s")
    return workdir, proc.stdout


def metric_lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_run_reports_the_backend(short_run):
    _, stdout = short_run
    assert "JAX backend: cpu; devices: [CpuDevice(id=0)]" in stdout


def test_short_run_builds_the_codebook(short_run):
    workdir, stdout = short_run
    codebook = np.load(workdir / "codebook" / "codebook.npy")
    assert codebook.shape == (SHORT["CODEBOOK_SIZE"], 48) and np.isfinite(codebook).all()  # 4x4x3 pixel patches
    assert f"codebook: {codebook.shape}" in stdout


def test_short_run_trains_and_exports_the_tokenizer(short_run):
    workdir, stdout = short_run
    config = json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())
    assert config["quantizer"]["num_codes"] == SHORT["CODEBOOK_SIZE"]
    assert config["ddconfig"]["resolution"] == SHORT["IMAGE_SIZE"]
    lines = metric_lines(workdir / "metrics.jsonl")
    losses = [m for m in lines if "rec_loss" in m]
    assert [m["step"] for m in losses] == list(range(1, SHORT["TOKENIZER_STEPS"] + 1))  # schedule(): 20 points
    assert losses[-1]["rec_loss"] < losses[0]["rec_loss"]
    assert all(0 < m["window_utilization"] <= 1 for m in losses)
    # Images to tokens and back: 8 validation crops (one per photo), tokens at the factor of ch_mult (1, 2).
    side = SHORT["IMAGE_SIZE"]
    assert (f"images ({NUM_PHOTOS}, {side}, {side}, 3) -> tokens ({NUM_PHOTOS}, {side // 2}, {side // 2}) -> "
            f"reconstructions ({NUM_PHOTOS}, {side}, {side}, 3)") in stdout


def test_short_run_encodes_and_trains_the_gpt(short_run):
    workdir, stdout = short_run
    manifest = json.loads((workdir / "encoded" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["flip"] and manifest["total_images"] > 1000
    assert manifest["token_shape"] == [SHORT["IMAGE_SIZE"] // 2] * 2
    generator = json.loads((workdir / "gpt" / "generator" / "generator.json").read_text())
    assert generator["dataset"]["num_codes"] == SHORT["CODEBOOK_SIZE"]
    assert generator["dataset"]["num_classes"] == NUM_PHOTOS
    losses = [m for m in metric_lines(workdir / "gpt" / "metrics.jsonl") if "loss" in m]
    assert losses[-1]["step"] == SHORT["GPT_STEPS"] and losses[-1]["loss"] < losses[0]["loss"]
    side = SHORT["IMAGE_SIZE"]
    assert f"samples: ({NUM_PHOTOS * SHORT['SAMPLES_PER_CLASS']}, {side}, {side}, 3)" in stdout


@pytest.mark.parametrize("name, layout", [("reconstructions.png", "wide"), ("utilization.png", "wide"),
                                          ("samples.png", "tall")])
def test_short_run_draws_the_figures(short_run, name, layout):
    workdir, _ = short_run
    image = np.asarray(Image.open(workdir / "figures" / name).convert("RGB"))
    assert min(image.shape[:2]) > 100 and image.std() > 10  # drawn, not blank
    # reconstructions: 3 rows (original, tokens, decoded) x 8 photos; samples: 8 photos x 2 samples per photo
    assert (image.shape[1] > image.shape[0]) == (layout == "wide")
