"""Shared test set-up: 8 fake CPU devices (set before jax is imported) and the team's parity fixtures.

Parity tests read `../shared/fixtures` beside the repository. A plain clone has none: those tests then skip and say
what is missing, unless `VQLC_REQUIRE_FIXTURES=1` (set by `.ci/run`) makes the fixtures required.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
REQUIRE_FIXTURES = "VQLC_REQUIRE_FIXTURES"


def find_fixtures(path: pathlib.Path = FIXTURES) -> pathlib.Path:
    """`path` if it is a folder; else skips the calling test, or fails it under `VQLC_REQUIRE_FIXTURES=1`."""
    if not path.is_dir():
        message = f"the team's parity fixtures are not at {path} (the folder shared/fixtures beside the repository)"
        if os.environ.get(REQUIRE_FIXTURES) == "1":
            raise FileNotFoundError(f"{message}; {REQUIRE_FIXTURES}=1 makes them required")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """`../shared/fixtures` beside the project root (only tests read it), found by `find_fixtures`."""
    return find_fixtures()


@pytest.fixture(scope="session")
def official_tiny(fixtures_dir) -> dict:
    """The official `tiny_linear` fixture: `state_dict` (official keys, VGG16 trunk rebuilt as its README says),
    `ddconfig`, the reference arrays (images NHWC) and the `.pth` path."""
    import json

    import numpy as np

    root = fixtures_dir / "official_vqgan_lc"
    meta = json.loads((root / "tiny_linear.json").read_text())
    with np.load(root / "tiny_linear.npz") as data:
        arrays = {k: data[k] for k in data.files}
    state_dict = {k.removeprefix("state_dict/"): v for k, v in arrays.items() if k.startswith("state_dict/")}
    trunk = meta["vgg_trunk"]
    vgg = {}
    for i, (name, shape) in enumerate(trunk["params"]):
        scale = 0.05 if name.endswith(".weight") else 0.01
        vgg[f"perceptual_loss.net.{name}"] = (
            np.random.default_rng(trunk["seed"] + i).standard_normal(shape, dtype=np.float32) * scale)
    nhwc = {k: arrays[k].transpose(0, 2, 3, 1) for k in ("input", "reconstruction", "encoded", "disc_logits")}
    return {
        "meta": meta,
        "ddconfig": meta["ddconfig"],
        "pth": root / "tiny_linear.pth",
        "state_dict": state_dict,
        "vgg_trunk": vgg,
        **{k: v for k, v in arrays.items() if not k.startswith("state_dict/")},
        **nhwc,
    }


def relative_error(got, want) -> float:
    """max |got - want| / max |want|: the fixtures' tolerance measure."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def override(config, **overrides):
    """`config` with dotted keys set (`override(c, **{"model.width": 32})`); returns it."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def read_metrics(workdir) -> dict:
    """{step: metrics} of the loss lines of a run's `metrics.jsonl`."""
    import json

    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}


class StopAt:
    """Stands in for SIGTERM: asks the training loop to stop once `step` steps have run."""

    def __init__(self, step: int):
        self.step, self.calls = step, 0

    @property
    def requested(self) -> bool:
        self.calls += 1
        return self.calls >= self.step

    def restore(self):
        pass


def metrics_of_local_processes(flags, tmp_path, step: int) -> dict:
    """{processes: metrics at `step`} of the trainer run as 1 process x 4 devices and as 2 processes x 2 devices
    (`launch/local_multiprocess.sh`, jax.distributed over loopback) with the command-line `flags`."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    results = {}
    for processes, devices in ((1, 4), (2, 2)):
        workdir = tmp_path / f"p{processes}"
        subprocess.run(["bash", "launch/local_multiprocess.sh", str(processes), str(devices), *flags,
                        "--workdir", str(workdir)], cwd=PROJECT_ROOT, env=env, check=True, timeout=600,
                       capture_output=True)
        results[processes] = read_metrics(workdir)[step]
    return results
