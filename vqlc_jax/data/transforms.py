"""Image transforms (numpy/PIL, host side): decode, resize the smaller side then crop, scale to [-1, 1].

Resampling is PIL bicubic, which is antialiased when downsampling (the filter support widens with the scale).
Resize-then-crop is done in one PIL call on the crop's box in source pixels: identical to resizing the whole
image and cropping, with an exactly isotropic scale and less work.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: np.ndarray | bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB from encoded bytes (any PIL format) or a uint8 array (gray, RGB or RGBA).

    Raises (PIL's UnidentifiedImageError / OSError, or ValueError) on empty, corrupt or truncated data.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"expected a uint8 HW, HW1, HW3 or HW4 array, got {data.dtype} {data.shape}")
        if data.ndim == 2:
            data = data[..., None]
        return np.ascontiguousarray(np.broadcast_to(data, data.shape[:2] + (3,)) if data.shape[-1] == 1
                                    else data[..., :3])
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes now, so truncated files raise here
        return np.asarray(image.convert("RGB"))


def crop_offset(height: int, width: int, size: int, rng: np.random.Generator | None) -> tuple[int, int, float]:
    """(top, left, scale) of a size x size crop of the image resized so its smaller side is `size`.

    `scale` = size / min(height, width); top/left are in resized pixels, uniform over the valid range when `rng`
    is given, centred (rounded as torchvision's centre crop) when it is None.
    """
    scale = size / min(height, width)
    spare_h = max(round(height * scale) - size, 0)
    spare_w = max(round(width * scale) - size, 0)
    if rng is None:
        return round(spare_h / 2), round(spare_w / 2), scale
    return int(rng.integers(spare_h + 1)), int(rng.integers(spare_w + 1)), scale


def resize_box(image: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the (left, top, right, bottom) box of `image` resampled bicubically."""
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=box))


def resize_crop(image: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 [size, size, 3]: smaller side resized to `size`, then a random (rng) or centre (None) square crop."""
    height, width = image.shape[:2]
    top, left, scale = crop_offset(height, width, size, rng)
    box = (left / scale, top / scale, min((left + size) / scale, width), min((top + size) / scale, height))
    return resize_box(Image.fromarray(image), box, size)


def to_float(image: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] from uint8."""
    return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)
