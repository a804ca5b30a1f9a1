"""The tokenizer model a config names: `build_model(model_config)` gives a `VQModel` (`models.vqgan`), or an
`FQModel` (`models.fqgan`) when the quantizer is the factorized `fq`."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vqlc_jax.models.fqgan import build_fqgan
from vqlc_jax.models.vqgan import VQModel, build_vqgan, check_model_config


def build_model(model_config: Mapping[str, Any]) -> VQModel:
    """`build_fqgan` when `quantizer.name == 'fq'`, else `build_vqgan`."""
    check_model_config(model_config)
    if dict(model_config["quantizer"]).get("name") == "fq":
        return build_fqgan(model_config)
    return build_vqgan(model_config)


def dummy_images(config: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
    """One image of the configured resolution: what `init` needs to build the variables."""
    ddconfig = config["ddconfig"]
    res = int(ddconfig.get("resolution", 256))
    return jax.ShapeDtypeStruct((1, res, res, int(ddconfig.get("in_channels", 3))), jnp.float32)
