"""Every trainer config file (tokenizer, generator or classifier) loads, names its variants, and passes
validation; the baselines differ from the LC recipe only in the quantizer (tokenizers) or the codebook size (GPT)."""

import importlib.util

import pytest
from conftest import PROJECT_ROOT

from vqlc_jax.generators import config as generator_config
from vqlc_jax.train import classifier
from vqlc_jax.train import config as config_lib

TRAINER_CONFIGS = sorted(p for p in (PROJECT_ROOT / "configs").glob("*.py"))


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("path", TRAINER_CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path):
    config = load(path)
    if "generator" in config:
        assert config.data.encoded_dir == ""  # a path the user supplies: validation must ask for it
        with pytest.raises(ValueError, match="data.encoded_dir"):
            generator_config.validate(config)
        config.data.encoded_dir = "encoded"
        generator_config.validate(config)
    elif "classifier" in config:
        assert config.data.encoded_dir == config.data.eval_encoded_dir == ""  # paths the user supplies
        with pytest.raises(ValueError, match="data.encoded_dir"):
            classifier.validate(config)
        config.data.encoded_dir = config.data.eval_encoded_dir = "encoded"
        classifier.validate(config)
    elif config.model.quantizer.name == "lc" and config.codebook_init == "file":
        assert config.codebook_path == ""  # a path the user supplies: validation must ask for it
        with pytest.raises(ValueError, match="codebook_path"):
            config_lib.validate(config)
        config.codebook_path = "codebook.npy"
        config_lib.validate(config)
    else:
        config_lib.validate(config)
    with pytest.raises(ValueError, match="unknown variant"):
        load(path, "no-such-variant")


def test_baselines_share_the_lc_recipe():
    lc = load(PROJECT_ROOT / "configs" / "vqgan_lc_imagenet_f16.py")
    for name, quantizer in (("vqgan_imagenet", "vq"), ("vqgan_fc_imagenet", "fc"), ("vqgan_ema_imagenet", "ema")):
        baseline = load(PROJECT_ROOT / "configs" / f"{name}.py")
        assert baseline.model.quantizer.name == quantizer and baseline.model.quantizer.num_codes == 16_384
        assert baseline.model.ddconfig.to_dict() == lc.model.ddconfig.to_dict()
        assert baseline.model.embed_dim == lc.model.embed_dim
        assert baseline.total_steps == lc.total_steps and baseline.optimizer.to_dict() == lc.optimizer.to_dict()


def test_gpt_baselines_share_the_lc_recipe():
    lc = load(PROJECT_ROOT / "configs" / "gpt_imagenet_lc100k.py")
    assert (lc.model.num_layers, lc.model.num_heads, lc.model.width) == (24, 16, 1024)
    assert lc.global_batch_size == 1024 and lc.optimizer.lr == 4.5e-4 and lc.total_steps == 100 * (1_281_167 // 1024)
    for name in ("gpt_imagenet_fc16k", "gpt_imagenet_ema16k"):
        baseline = load(PROJECT_ROOT / "configs" / f"{name}.py")
        assert baseline.model.num_codes == 16_384
        baseline.model.num_codes = lc.model.num_codes
        assert baseline.to_dict() == lc.to_dict()
    cfg = load(PROJECT_ROOT / "configs" / "gpt_imagenet_lc100k.py", "cfg")
    assert cfg.model.null_class and cfg.loss.class_dropout == 0.1 and cfg.sample.cfg_scale == 2.0
