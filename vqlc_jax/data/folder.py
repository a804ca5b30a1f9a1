"""Images in a folder: `root/split/class/*.jpg` (label = index of the class among the SORTED class folders) or
`root/split/*.jpg` (no class folders, label 0). Files are sorted by name; records hold the encoded bytes."""

from __future__ import annotations

import os
import pathlib

from vqlc_jax.data.sources import Record

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def _entries(directory: pathlib.Path, folders: bool) -> list[str]:
    """Sorted names of the sub-folders, or of the image files (by extension, any case), directly inside
    `directory`; hidden names (starting with '.') are ignored."""
    return sorted(e.name for e in os.scandir(directory) if not e.name.startswith(".") and (
        e.is_dir() if folders else e.is_file() and os.path.splitext(e.name)[1].lower() in EXTENSIONS))


class FolderSource:
    """A `Source` over `root/split`; `class_names` are the sorted class folders (empty without classes)."""

    def __init__(self, split: str, root: str | os.PathLike):
        directory = pathlib.Path(root) / split
        if not directory.is_dir():
            found = _entries(directory.parent, folders=True) if directory.parent.is_dir() else []
            raise FileNotFoundError(f"split folder {directory} not found (folders in {root}: {found})")
        loose = _entries(directory, folders=False)
        classes = _entries(directory, folders=True)
        if loose and classes:
            raise ValueError(f"{directory} holds both image files ({loose[0]}, ...) and class folders "
                             f"({classes[0]}, ...); use root/split/class/* or root/split/*")
        self.directory = directory
        self.class_names: tuple[str, ...] = tuple(classes)
        self.num_classes = max(len(classes), 1)
        if classes:
            self.files = [(f"{c}/{name}", label) for label, c in enumerate(classes)
                          for name in _entries(directory / c, folders=False)]
        else:
            self.files = [(name, 0) for name in loose]
        if not self.files:
            raise ValueError(f"no image files ({', '.join(sorted(EXTENSIONS))}) in {directory}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        key, label = self.files[index]
        return Record((self.directory / key).read_bytes(), label, key)
