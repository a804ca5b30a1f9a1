"""What the generator trainer needs from a model family, and the registry it chooses from by `config.generator`.

A family turns the config and the encoded dataset into a model, a pure loss and a pure sampler; the trainer
(`vqlc_jax.train.generator`) owns optimisers, EMA, checkpoints and loops, and never looks inside a family.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array
PyTree = Any

# config.generator -> "module:class" (imported on use, so a family's dependencies load only when it is chosen).
FAMILIES = {"gpt": "vqlc_jax.generators.ar:GPTFamily", "far": "vqlc_jax.generators.far:FARFamily",
            "dit": "vqlc_jax.generators.latent:DiTFamily",
            "sit": "vqlc_jax.generators.latent:SiTFamily", "ldm": "vqlc_jax.generators.latent:LDMFamily"}


class Family(abc.ABC):
    """A generator family bound to a config and a dataset.

    `fields`: the dataset arrays a batch carries (besides `label`): ("tokens",) or ("latents",).
    `loss(params, batch, rng) -> (scalar, metrics)` and `sample(params, rng, labels, options) -> samples` are pure
    (jit-able); `samples_to_tokens` gives the token maps whose code usage is counted (None: not a token model).
    """

    fields: tuple[str, ...]
    config: ml_collections.ConfigDict  # the run's config, with what the family read off the data
    num_classes: int
    model: Any

    @abc.abstractmethod
    def init_params(self, rng: Array) -> PyTree:
        """Fresh parameters."""

    @abc.abstractmethod
    def loss(self, params: PyTree, batch: dict[str, Array], rng: Array) -> tuple[Array, dict[str, Array]]:
        """Training loss of one (sharded) batch."""

    @abc.abstractmethod
    def sample(self, params: PyTree, rng: Array, labels: Array, options: ml_collections.ConfigDict) -> Array:
        """Samples for `labels` [B] with `options` (`config.sample`)."""

    @abc.abstractmethod
    def decode(self, tokenizer: Any, samples: np.ndarray) -> np.ndarray:
        """Images [B, H, W, 3] in [-1, 1] from samples, with the tokenizer."""

    def samples_to_tokens(self, tokenizer: Any, samples: np.ndarray) -> np.ndarray | None:
        return None


def drop_labels(rng: Array, labels: Array, *, rate: float, null_label: int) -> Array:
    """Labels replaced by `null_label` with probability `rate` (classifier-free guidance training)."""
    if rate <= 0.0:
        return labels
    return jnp.where(jax.random.bernoulli(rng, rate, labels.shape), null_label, labels)


def check_size(config: ml_collections.ConfigDict, key: str, from_data: int, where: str) -> None:
    """A size the config states (`model.<key>`, 0: unstated) must be the encoded dataset's."""
    stated = config.model[key]
    if stated and stated != from_data:
        raise ValueError(f"config.model.{key}={stated} does not match the {from_data} of the encoded dataset "
                         f"{where} (set 0 to read it off the dataset)")


def make_family(config: ml_collections.ConfigDict, dataset: Any) -> Family:
    """The family `config.generator` names, bound to `config` and the encoded `dataset`."""
    if config.generator not in FAMILIES:
        raise ValueError(f"config.generator={config.generator!r}: choices: {', '.join(sorted(FAMILIES))}")
    codebooks = int(getattr(dataset, "num_codebooks", 1))
    if codebooks > 1 and config.generator == "gpt":
        raise ValueError(f"config.generator='gpt': the encoded dataset {getattr(dataset, 'directory', '')} holds "
                         f"token maps of {codebooks} sub-codebooks {list(dataset.token_shape)}; train "
                         "generator='far' on it")
    module, name = FAMILIES[config.generator].split(":")
    return getattr(importlib.import_module(module), name)(config, dataset)
