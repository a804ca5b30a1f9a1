"""Hugging Face DINOv2 checkpoint keys -> `models.dinov2` parameter paths.

The files (`save_pretrained` of transformers 4 and 5 alike) name the attention `attention.attention.query|key|value`
and `attention.output.dense`; transformers 5 renames them `attention.q_proj|k_proj|v_proj|o_proj` in memory. Both
spellings are accepted and land on `attention/q_proj|k_proj|v_proj|out_proj`; every other key maps by
`default_path`. `embeddings.mask_token` (masked-image pre-training only) has no parameter and is skipped.
"""

from __future__ import annotations

from vqlc_jax.convert.torch_layout import Path, default_path

DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.out_proj."),
    ("attention.o_proj.", "attention.out_proj."),
)
_SKIPPED = ("embeddings.mask_token",)


def checkpoint_key_to_path(key: str) -> Path | None:
    """A `Dinov2Model` / `Dinov2WithRegistersModel` key -> Flax path; None for skipped keys."""
    if key in _SKIPPED:
        return None
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return default_path(key)
