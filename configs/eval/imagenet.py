"""Evaluate a 256-px tokenizer on the 50,000 ImageNet validation images (the paper's setting).

    python -m vqlc_jax.evaluate --tokenizer DIR --config configs/eval/imagenet.py \
        --config.data.options.data_dir=/data/tfds --config.lpips_path=lpips_vgg.npz \
        --config.fid_path=pt_inception-2015-12-05-6726825d.pth
"""

import ml_collections


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/eval/imagenet.py: unknown variant {arg!r} (it has none)")
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(name="imagenet2012", options={"data_dir": ""}, resolution=256,
                                            eval_split="validation", eval_max_images=0))
    c.batch_size = 256
    c.lpips_path = ""
    c.fid_path = ""
    return c
