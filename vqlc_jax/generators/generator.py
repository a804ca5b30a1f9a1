"""A trained generator as a library object: `Generator.load(dir)`, `sample`, `generate` (decoded images).

    gen = Generator.load("workdir/generator")        # written at the end of a generator run
    tokens = gen.sample(jax.random.key(0), labels)   # token maps [B, h, w] (GPT)
    images = gen.generate(jax.random.key(0), labels) # decoded with the run's tokenizer, [B, H, W, 3] in [-1, 1]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vqlc_jax.generators.family import Family, make_family

CONFIG_FILE = "generator.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The sizes a family reads off its encoded dataset, kept with an exported generator."""

    num_codes: int
    num_classes: int
    token_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    tokenizer_dir: str = ""
    directory: str = ""

    @classmethod
    def of(cls, dataset: Any, tokenizer_dir: str = "") -> "DatasetInfo":
        return cls(int(dataset.num_codes), int(dataset.num_classes), tuple(dataset.token_shape),
                   tuple(dataset.latent_shape), tokenizer_dir, str(getattr(dataset, "directory", "")))


class Generator:
    """A family bound to its config, dataset sizes and (EMA) parameters."""

    def __init__(self, config: ml_collections.ConfigDict, info: DatasetInfo, params: Any):
        self.config, self.info, self.params = config, info, params
        self.family: Family = make_family(config, info)
        self._sample = jax.jit(lambda p, rng, labels, options: self.family.sample(p, rng, labels, options),
                               static_argnums=(3,))
        self._tokenizer = None

    def sample(self, rng: jax.Array, labels, **options) -> np.ndarray:
        """Samples for `labels` [B]; `options` override `config.sample` (temperature, top_k, top_p, cfg_scale)."""
        sample_options = ml_collections.FrozenConfigDict({**self.config.sample.to_dict(), **options})
        return np.asarray(self._sample(self.params, rng, jax.numpy.asarray(labels, jax.numpy.int32),
                                       sample_options))

    def generate(self, rng: jax.Array, labels, tokenizer: Any = None, **options) -> np.ndarray:
        """Decoded samples [B, H, W, 3] in [-1, 1] (the run's tokenizer unless one is given)."""
        return self.family.decode(tokenizer or self.tokenizer(), self.sample(rng, labels, **options))

    def tokenizer(self):
        if self._tokenizer is None:
            from vqlc_jax.tokenizer import Tokenizer

            if not self.info.tokenizer_dir:
                raise ValueError("this generator records no tokenizer directory: pass `tokenizer=`")
            self._tokenizer = Tokenizer.load(self.info.tokenizer_dir)
        return self._tokenizer

    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes `generator.json` (config and dataset sizes) and `params/` (orbax); refuses to overwrite."""
        directory = pathlib.Path(directory).absolute()
        target = directory / PARAMS_DIR
        exists = target.exists()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"generator save {directory}")
        if exists:
            raise FileExistsError(f"{target} already exists; choose an empty directory (nothing was overwritten)")
        directory.mkdir(parents=True, exist_ok=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(target, self.params)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            meta = {"config": self.config.to_dict(), "dataset": dataclasses.asdict(self.info)}
            (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> "Generator":
        directory = pathlib.Path(directory).absolute()
        meta_file = directory / CONFIG_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: not a directory written by Generator.save")
        meta = json.loads(meta_file.read_text())
        config = ml_collections.ConfigDict(meta["config"])
        d = meta["dataset"]
        info = DatasetInfo(**{**d, "token_shape": tuple(d["token_shape"]), "latent_shape": tuple(d["latent_shape"])})
        family = make_family(config, info)
        abstract = jax.eval_shape(family.init_params, jax.random.key(0))
        params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, abstract)
        return cls(config, info, params)
