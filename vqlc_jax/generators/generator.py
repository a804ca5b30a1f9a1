"""A trained generator as a library object: `Generator.load(dir)`, `sample`, `generate` (decoded images).

    gen = Generator.load("workdir/generator")        # written at the end of a generator run
    tokens = gen.sample(jax.random.key(0), labels)   # token maps [B, h, w] (GPT)
    images = gen.generate(jax.random.key(0), labels) # decoded with the run's tokenizer, [B, H, W, 3] in [-1, 1]
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from vqlc_jax import export
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
    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()
    tokenizer_dir: str = ""
    directory: str = ""

    @classmethod
    def of(cls, dataset: Any, tokenizer_dir: str = "") -> "DatasetInfo":
        return cls(int(dataset.num_codes), int(dataset.num_classes), tuple(dataset.token_shape),
                   tuple(dataset.latent_shape), tuple(map(float, dataset.latent_mean)),
                   tuple(map(float, dataset.latent_std)), tokenizer_dir, str(getattr(dataset, "directory", "")))


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
        meta = {"config": self.config.to_dict(), "dataset": dataclasses.asdict(self.info)}
        return export.save(directory, self.params, arrays_dir=PARAMS_DIR, meta_file=CONFIG_FILE, meta=meta)

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> "Generator":
        meta = export.read_meta(directory, CONFIG_FILE, "Generator.save")
        config = ml_collections.ConfigDict(meta["config"])
        d = meta["dataset"]
        info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        abstract = jax.eval_shape(make_family(config, info).init_params, jax.random.key(0))
        return cls(config, info, export.restore(directory, PARAMS_DIR, abstract))
