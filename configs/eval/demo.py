"""Evaluate the demo tokenizer on the bundled validation photos.

    python -m vqlc_jax.evaluate --workdir /tmp/vqlc_demo --config configs/eval/demo.py

LPIPS / rFID are computed only where their converted weights are given (see README); otherwise the report says
they are unavailable and why.
"""

import ml_collections


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/eval/demo.py: unknown variant {arg!r} (it has none)")
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(name="bundled", options={"resolution": 32}, resolution=32,
                                            eval_split="validation", eval_max_images=0))
    c.batch_size = 16
    c.lpips_path = ""  # e.g. lpips_vgg.npz
    c.fid_path = ""  # e.g. pt_inception-2015-12-05-6726825d.pth or its .npz conversion
    return c
