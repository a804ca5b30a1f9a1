"""ImageNet-2012 through TensorFlow Datasets, read with random access from its array_record files.

Preparation, once (converts the two manually downloaded tars; TensorFlow is needed for this step only):

    pip install tensorflow-cpu==2.21.0 importlib_resources==7.1.0
    python -m vqlc_jax.data.imagenet --manual_dir=DIR_WITH_THE_TARS --data_dir=~/tensorflow_datasets

`DIR_WITH_THE_TARS` holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org). Reading
afterwards needs tensorflow-datasets and array_record, not TensorFlow; records keep the JPEG bytes, which the
pipeline's workers decode.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from types import ModuleType

from vqlc_jax.data.sources import Record

NAME = "imagenet2012"
SPLITS = ("train", "validation")
TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
READ_REQUIREMENTS = "tensorflow-datasets==4.9.10 array_record==0.8.6"
PREPARE_REQUIREMENTS = "tensorflow-cpu==2.21.0 importlib_resources==7.1.0"
PREPARE_COMMAND = "python -m vqlc_jax.data.imagenet --manual_dir=DIR_WITH_THE_TARS --data_dir=DATA_DIR"


def _expand(path: str | os.PathLike | None) -> str | None:
    return None if path is None else os.path.expanduser(os.fspath(path))


def _tfds() -> ModuleType:
    try:
        import tensorflow_datasets
    except ImportError as error:
        raise ImportError(f"the {NAME} source needs `pip install {READ_REQUIREMENTS}`") from error
    return tensorflow_datasets


def prepare(manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
    """Builds the array_record dataset under `data_dir` (tfds' default when None) from the tars in `manual_dir`."""
    missing = [str(path) for path in (pathlib.Path(_expand(manual_dir)) / tar for tar in TARS) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{NAME} preparation needs {', '.join(missing)} (download from image-net.org)")
    for module in ("tensorflow", "importlib_resources"):
        try:
            __import__(module)
        except ImportError as error:
            raise ImportError(f"preparing {NAME} (once) needs `pip install {PREPARE_REQUIREMENTS}`; "
                              f"{module} is missing (reading the prepared data does not need it)") from error
    tfds = _tfds()
    builder = tfds.builder(NAME, data_dir=_expand(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=_expand(manual_dir)))


class ImageNetSource:
    """A `Source` over a prepared split ("train" or "validation"), in the prepared files' fixed order; records
    hold JPEG bytes, `key` is the original file name."""

    def __init__(self, split: str, data_dir: str | os.PathLike | None = None):
        if split not in SPLITS:
            raise ValueError(f"{NAME} split {split!r} not in {SPLITS}")
        tfds = _tfds()
        builder = tfds.builder(NAME, data_dir=_expand(data_dir))
        if not builder.is_prepared():
            raise FileNotFoundError(f"{NAME} is not prepared under {builder.data_dir}; run once: {PREPARE_COMMAND}")
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(f"{NAME} under {builder.data_dir} is stored as {builder.info.file_format}, random "
                             f"access needs array_record; prepare it again into another data_dir: {PREPARE_COMMAND}")
        labels = builder.info.features["label"]
        self.num_classes: int = labels.num_classes
        self.class_names: tuple[str, ...] = tuple(labels.names)
        self._records = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        record = self._records[index]
        name = record["file_name"]
        return Record(record["image"], int(record["label"]), name.decode() if isinstance(name, bytes) else name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"Prepare {NAME} (array_record) from the manually downloaded tars.")
    parser.add_argument("--manual_dir", required=True, help=f"folder holding {' and '.join(TARS)}")
    parser.add_argument("--data_dir", default=None, help="tfds data dir (default: ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    prepare(args.manual_dir, args.data_dir)


if __name__ == "__main__":
    main()
