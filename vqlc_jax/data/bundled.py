"""The embedded demo dataset: square crops of the RGB photos shipped with scikit-image and scikit-learn.

No download. Each photo is cut along its longer axis: the first `1 - val_fraction` is the train region, the rest the
validation region, so no train crop shares a pixel with a validation crop. In each region, for each scale, square
crops of side `scale * (region's smaller side)` lie on a centred grid with step `stride * side`; every crop is
resized (PIL bicubic, antialiased) to `resolution`. Label = the photo's index in `PHOTOS`. Built once per
configuration and cached in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from vqlc_jax.data.sources import Record
from vqlc_jax.data.transforms import resize_box


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        image = getattr(data, name)()
        return image[0] if name == "stereo_motorcycle" else image  # (left, right, disparity): the left view

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


# The natural RGB photos that load offline (files shipped inside the wheels; no pooch download).
_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "china": _sklearn("china"),
    "flower": _sklearn("flower"),
}
PHOTOS: tuple[str, ...] = tuple(_LOADERS)
SPLITS = ("train", "validation")


class Crop(NamedTuple):
    """A square crop of photo `PHOTOS[photo]`: rows [top, top + size), columns [left, left + size)."""

    photo: int
    top: int
    left: int
    size: int

    @property
    def key(self) -> str:
        return f"{PHOTOS[self.photo]}/{self.size}px/{self.top}_{self.left}"


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB photo `name` (one of `PHOTOS`)."""
    if name not in _LOADERS:
        raise KeyError(f"unknown bundled photo {name!r}; expected one of {PHOTOS}")
    return np.ascontiguousarray(_LOADERS[name]()[..., :3])


def _grid(start: int, extent: int, size: int, step: int) -> range:
    """Offsets of size-long windows every `step` inside [start, start + extent), the grid centred."""
    count = (extent - size) // step + 1
    first = start + (extent - size - (count - 1) * step) // 2
    return range(first, first + count * step, step)


def crop_layout(photo: int, height: int, width: int, split: str, scales: Sequence[float], stride: float,
                val_fraction: float) -> list[Crop]:
    """The crops of one photo for `split`, all inside that split's region (see the module docstring)."""
    vertical = height > width  # cut along the longer axis
    length = height if vertical else width
    cut = round(length * (1 - val_fraction))
    start, extent = (0, cut) if split == "train" else (cut, length - cut)
    region_h, region_w = (extent, width) if vertical else (height, extent)
    crops = []
    for scale in scales:
        size = max(1, round(scale * min(region_h, region_w)))
        step = max(1, round(stride * size))
        rows = _grid(start, extent, size, step) if vertical else _grid(0, height, size, step)
        cols = _grid(0, width, size, step) if vertical else _grid(start, extent, size, step)
        crops += [Crop(photo, top, left, size) for top in rows for left in cols]
    return crops


@functools.cache
def _build(split: str, resolution: int, scales: tuple[float, ...], stride: float,
           val_fraction: float) -> tuple[np.ndarray, list[Crop]]:
    crops, images = [], []
    for photo, name in enumerate(PHOTOS):
        image = load_photo(name)
        layout = crop_layout(photo, *image.shape[:2], split, scales, stride, val_fraction)
        crops += layout
        images += [resize_box(image, (c.left, c.top, c.left + c.size, c.top + c.size), resolution) for c in layout]
    stacked = np.stack(images)
    stacked.flags.writeable = False  # shared by every source built with this configuration
    return stacked, crops


class BundledSource:
    """Crops of the bundled photos as a `Source` of uint8 [resolution, resolution, 3] arrays."""

    num_classes = len(PHOTOS)

    def __init__(self, split: str, resolution: int = 64, scales: Sequence[float] = (1.0, 0.7, 0.5, 0.35, 0.25),
                 stride: float = 0.5, val_fraction: float = 0.25):
        if split not in SPLITS:
            raise ValueError(f"bundled split {split!r} not in {SPLITS}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"bundled val_fraction={val_fraction} must lie in (0, 1)")
        if stride <= 0 or not scales or not all(0 < s <= 1 for s in scales):
            raise ValueError(f"bundled stride={stride} must be > 0 and scales={scales} in (0, 1]")
        self.images, self.crops = _build(split, int(resolution), tuple(map(float, scales)), float(stride),
                                         float(val_fraction))

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> Record:
        crop = self.crops[index]
        return Record(self.images[index], crop.photo, crop.key)
