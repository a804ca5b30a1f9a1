"""Build `models.inception.InceptionV3` variables from pytorch-fid's weights, and store them as one flat `.npz`.

Source: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's FID_WEIGHTS_URL), a bare state dict of torchvision's
`Inception3(num_classes=1008, aux_logits=False)` with the FID blocks: `Conv2d_1a_3x3.conv.weight`,
`Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}`, `Mixed_5b.branch1x1.conv.weight`, ... and the 1008-way
classifier `fc.{weight,bias}`: its weight becomes `params/fc/kernel` (the Inception Score's logits), its bias is
skipped (the score uses the bias-free logits, `models.inception`). That file predates torch 1.6's zip format: if
`load_torch_file` cannot read it without torch, convert it once where torch is installed and keep the `.npz`
(`npz_variables.save_variables`). `.npz` files converted before the classifier was kept still load (pool features
only, so FID works and the Inception Score is unavailable).
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.convert.npz_variables import load_variables
from vqlc_jax.convert.torch_layout import Path, default_path, map_state_dict
from vqlc_jax.models.inception import INPUT_SIZE, InceptionV3

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


LOGITS_KEY = "params/fc/kernel"  # the flat `.npz` key of the classifier


def inception_template(with_logits: bool = True) -> dict:
    """Shapes and dtypes of the InceptionV3 variables, with or without the `fc` classifier (no computation)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3(resize_input=False, with_logits=with_logits).init, jax.random.key(0), x)


def has_logits(variables: Mapping) -> bool:
    """Whether `variables` hold the classifier that `InceptionV3(with_logits=True)` needs."""
    return "fc" in variables["params"]


def _fid_key_to_path(key: str) -> Path | None:
    """The mechanical mapping, skipping the classifier's bias."""
    return None if key == "fc.bias" else default_path(key)


def inception_from_pytorch_fid(state_dict: Mapping[str, np.ndarray], source: str = "pytorch-fid state dict") -> dict:
    """InceptionV3 variables, classifier included, from pytorch-fid's state dict (numpy arrays, torch key names)."""
    return map_state_dict(state_dict, inception_template(), key_to_path=_fid_key_to_path, source=source)


def inception_from_pytorch_fid_file(path: str | os.PathLike) -> dict:
    """`inception_from_pytorch_fid` on the `.pth` file."""
    from vqlc_jax.convert.torch_file import load_torch_file  # lazy: only the file reader needs it

    return inception_from_pytorch_fid(load_torch_file(path), source=str(path))


def load_inception_variables(path: str | os.PathLike) -> dict:
    """Reads converted variables written by `npz_variables.save_variables`, checked against the template (with the
    classifier when the file has `params/fc/kernel`, without it otherwise)."""
    with np.load(path) as data:
        with_logits = LOGITS_KEY in data.files
    return load_variables(path, inception_template(with_logits))
