"""Generation evaluation as the papers: 50 samples per class of ImageNet's 1,000 (50,000 samples), FID against an
ADM reference batch, Inception Score, precision/recall, generation utilization.

    python -m vqlc_jax.generators.evaluate --workdir W --config configs/eval/gen_imagenet.py \
        --config.inception_path=pt_inception-2015-12-05-6726825d.pth \
        --config.reference_path=VIRTUAL_imagenet256_labeled.npz

VQGAN-LC's paper used clean-fid against the ImageNet *train* images instead: set `--config.reference_path=` and
`--config.reference_data.name=imagenet2012 --config.reference_data.split=train` to compute that reference (with the
clean resize) from the prepared TFDS ImageNet. The report says which reference and resize were used.
"""

from vqlc_jax.generators.eval_config import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/eval/gen_imagenet.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.reference_data.update(name="", split="train", options={"data_dir": ""}, resolution=256)
    return c
