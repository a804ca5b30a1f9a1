"""The embedded demo dataset: square crops of the RGB photos shipped inside the scikit-image and scikit-learn wheels.

No download, no import of either library (the files are read with PIL; pixels equal `skimage.data.<name>()` and
`sklearn.datasets.load_sample_image`). Each photo is cut along its longer axis: the first `1 - val_fraction` is the
train region, the rest the validation region, so no train crop shares a pixel with a validation crop. Crop sides
are `scale * (the photo's smaller side)`, the same zoom levels in both splits; in each region the sides that fit
tile it on a centred grid with step `stride * side` (the validation band is narrow, so it holds only the smaller
scales). Every crop is resized (PIL bicubic, antialiased) to `resolution`. Label = the photo's index in `PHOTOS`.
Built once per configuration and cached in memory.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from vqlc_jax.data.sources import Record
from vqlc_jax.data.transforms import decode_image, resize_box

# The natural RGB photos that ship inside the installed wheels (no pooch download): name -> (package, file).
_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),  # skimage.data.stereo_motorcycle()[0]
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
PHOTOS: tuple[str, ...] = tuple(_FILES)
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
    if name not in _FILES:
        raise KeyError(f"unknown bundled photo {name!r}; expected one of {PHOTOS}")
    package, relative = _FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"bundled photo {name!r} needs the package {package!r} installed")
    return decode_image((pathlib.Path(spec.submodule_search_locations[0]) / relative).read_bytes())


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
    crops = []
    for scale in scales:
        size = max(1, round(scale * min(height, width)))
        if size > extent:
            continue
        step = max(1, round(stride * size))
        across = _grid(0, width if vertical else height, size, step)
        along = _grid(start, extent, size, step)
        rows, cols = (along, across) if vertical else (across, along)
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
        pil = Image.fromarray(image)
        images += [resize_box(pil, (c.left, c.top, c.left + c.size, c.top + c.size), resolution) for c in layout]
    if not crops:
        raise ValueError(f"no bundled {split} crop fits: scales={scales} too large for val_fraction={val_fraction}")
    stacked = np.stack(images)
    stacked.flags.writeable = False  # shared by every source built with this configuration
    return stacked, crops


class BundledSource:
    """Crops of the bundled photos as a `Source` of uint8 [resolution, resolution, 3] arrays."""

    num_classes = len(PHOTOS)

    def __init__(self, split: str, resolution: int = 64, scales: Sequence[float] = (0.75, 0.5, 0.35, 0.25, 0.18),
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
