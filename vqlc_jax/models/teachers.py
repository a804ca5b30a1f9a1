"""Frozen teachers for FQGAN's representation loss, loaded from Hugging Face folders: `load_teacher(name, folder)`.

A teacher maps images in [-1, 1] (NHWC) to one feature per image, as the release's `CLIPVisionTower` /
`DinoVisionTower` (`select_feature='cls'`): `x * 0.5 + 0.5`, resized to `size` x `size` (224) by torch's default
`F.interpolate` (nearest: source index floor(i * in / out)), normalised with the tower's mean and std, then

- `clip`: the last encoder layer's CLS token, **before** `post_layernorm`, no projection (`hidden_states[-1][:, 0]`;
  width 1024 for ViT-L/14, the Dual teacher; 768 for ViT-B/16, Triple's high-level teacher);
- `dinov2`: `last_hidden_state[:, 0]`, after the final layernorm (384 for dinov2-small, Triple's mid-level one).

The feature is under `stop_gradient`: the teacher is frozen and nothing flows back into the images through it (the
student's path, the FeatPredHead on the codes, is differentiated as usual).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax

from vqlc_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, TEACHER_SIZE, teacher_inputs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen tower: `teacher.features(variables, images)` -> [B, width]; `variables` come with it from
    `load_teacher` and stay out of the optimizer."""

    name: str
    folder: str
    width: int
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    cls_feature: Callable[[Any, Array], Array]  # (variables, normalised pixels [B, size, size, 3]) -> [B, width]

    def pixels(self, images: Array) -> Array:
        """Images in [-1, 1] -> the tower's input: [0, 1], nearest-resized to `size`, normalised."""
        return teacher_inputs(images * 0.5 + 0.5, size=self.size, mean=self.mean, std=self.std)

    def features(self, variables: Any, images: Array) -> Array:
        return jax.lax.stop_gradient(self.cls_feature(variables, self.pixels(jax.lax.stop_gradient(images))))


def _clip(folder: str | os.PathLike, size: int) -> tuple[Teacher, Any]:
    from vqlc_jax.codebook.clip import CLIP_MEAN, CLIP_STD, load_vision_tower
    from vqlc_jax.models.clip import CLIPVisionTower

    path, settings, params = load_vision_tower(folder, with_projection=False)
    tower = CLIPVisionTower(settings, with_projection=False)

    def cls_feature(variables, pixels):
        hidden, _ = tower.apply(variables, pixels, layer=-1, apply_post_layernorm=False, apply_projection=False)
        return hidden[:, 0]

    return Teacher("clip", str(path), settings.hidden_size, size, CLIP_MEAN, CLIP_STD, cls_feature), {"params": params}


def _dinov2(folder: str | os.PathLike, size: int) -> tuple[Teacher, Any]:
    from vqlc_jax.convert.hf_checkpoint import resolve_checkpoint
    from vqlc_jax.models.dinov2 import from_pretrained

    model, variables = from_pretrained(folder)
    cls_feature = lambda v, pixels: model.apply(v, pixels)["pooler_output"]  # noqa: E731
    return (Teacher("dinov2", str(resolve_checkpoint(folder)), model.config.hidden_size, size, IMAGENET_MEAN,
                    IMAGENET_STD, cls_feature), variables)


TEACHERS: dict[str, Callable[[str | os.PathLike, int], tuple[Teacher, Any]]] = {"clip": _clip, "dinov2": _dinov2}


def load_teacher(name: str, folder: str | os.PathLike, *, size: int = TEACHER_SIZE) -> tuple[Teacher, Any]:
    """(Teacher, its frozen variables) from a Hugging Face folder of the kind `name` ("clip" or "dinov2").

    A missing folder, a folder without config or weights, or one of another kind (e.g. a DINOv2 folder given as
    "clip") raises an error naming the teacher, the folder and what was found there."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choices: {', '.join(TEACHERS)}")
    if not str(folder):
        raise FileNotFoundError(f"teacher {name!r}: no folder given (a Hugging Face {name} folder: config.json + "
                                "model.safetensors)")
    try:
        return TEACHERS[name](folder, size)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"teacher {name!r} from {str(folder)!r}: {err}") from err
