"""Defaults of the generation evaluation job (`python -m vqlc_jax.generators.evaluate`; configs/eval/gen_*.py start
from `base_config`) and of the metric keys that the generator trainer's periodic evaluation shares with it."""

import ml_collections
from ml_collections import config_dict


def metrics_config() -> ml_collections.ConfigDict:
    """Inception weights, resize and FID reference."""
    c = ml_collections.ConfigDict()
    c.inception_path = ""  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its .npz conversion
    c.resize = "clean"  # clean-fid's PIL bicubic; "legacy": pytorch-fid's bilinear
    # FID reference: an ADM .npz (mu, sigma) or saved ReferenceStats; else statistics of a real split.
    c.reference_path = ""
    c.reference_data = ml_collections.ConfigDict(dict(name="", split="validation", options={}, resolution=256,
                                                      max_images=0))
    return c


def base_config() -> ml_collections.ConfigDict:
    c = metrics_config()
    c.samples_per_class = 50  # the papers' 50,000 ImageNet samples
    c.batch_size = 250
    c.seed = 0
    # Overrides of the trained config's `sample` options (None: keep the trained value).
    c.sample = ml_collections.ConfigDict(dict(
        temperature=config_dict.placeholder(float), top_k=config_dict.placeholder(int),
        top_p=config_dict.placeholder(float), cfg_scale=config_dict.placeholder(float)))
    return c
