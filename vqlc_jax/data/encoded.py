"""The encoded dataset (token maps, latents, labels written once by `python -m vqlc_jax.generators.encode`) and the
deterministic, resumable, process-sharded batches that generator trainers read from it.

    dataset = open_encoded("encoded_dir")            # checks the manifest, the files and every token's range
    for batch in make_encoded_pipeline(dataset, global_batch_size=256, seed=0, train=True, start_step=step,
                                       process_index=jax.process_index(), process_count=jax.process_count()):
        ...  # batch.tokens int32 [B, h, w] ([B, k, h, w] for k sub-codebooks), batch.label [B] int32,
             # batch.latents (with fields=(..., "latents"))

Batches follow exactly the image pipeline's rules (`vqlc_jax.data.pipeline.BatchOrder`): a batch is a pure function
of (dataset, seed, step, process), so a pipeline started at `start_step` yields what an uninterrupted one yields from
there and the P processes together read the one-process global batch. With `use_flips` on a dataset encoded with
flips, the examples are the (image, flipped?) pairs: example e < N is image e, example N + e its mirror image; each
training epoch is a permutation of all 2N. The shards are memory-mapped; a batch reads only its rows.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vqlc_jax.data import shards as shards_lib
from vqlc_jax.data.pipeline import BatchOrder
from vqlc_jax.quantizers.utilization import out_of_range

FORMAT = 1
LATENT_DTYPE = "float16"
COMMAND = "python -m vqlc_jax.generators.encode --tokenizer DIR --config configs/encode/<name>.py --workdir OUT"
# Manifest keys that must agree between a folder's shards and the run resuming into it.
RUN_KEYS = ("format", "tokenizer", "tokenizer_digest", "dataset", "flip", "token_shape", "latent_shape",
            "latent_dtype", "images_per_shard", "num_shards")
FIELDS = ("tokens", "latents", "label")


def encoded_job(flip: bool) -> shards_lib.ShardJob:
    """The encode job's shards: tokens, latents and labels (and the flipped images' tokens and latents)."""
    files = ("tokens", "latents", "labels") + (("tokens_flip", "latents_flip") if flip else ())
    return shards_lib.ShardJob(name="encoding", shard="encoded", command=COMMAND, files=files, run_keys=RUN_KEYS)


@dataclasses.dataclass(frozen=True)
class EncodedDataset:
    """A complete encoded dataset: `labels` int32 [num_images] in memory, the token and latent shards memory-mapped
    (`shards[name]`: one array per shard, names as `encoded_job(has_flips).files`). Build with `open_encoded`."""

    directory: pathlib.Path
    manifest: dict
    labels: np.ndarray
    shards: dict[str, list[np.ndarray]]
    offsets: np.ndarray  # first image of each shard, and the total at the end

    @property
    def num_images(self) -> int:
        return int(self.offsets[-1])

    @property
    def token_shape(self) -> tuple[int, int]:
        return tuple(self.manifest["token_shape"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    @property
    def num_codes(self) -> int:
        return int(self.manifest["tokenizer"]["num_codes"])

    @property
    def num_codebooks(self) -> int:
        """Sub-codebooks of the encoding tokenizer (FQGAN: 2 or 3; token maps [k, h, w]); 1: maps [h, w]."""
        return int(self.manifest["tokenizer"].get("num_codebooks", 1))

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """The size of each sub-codebook ((num_codes,) for a single codebook)."""
        return tuple(int(n) for n in self.manifest["tokenizer"].get("codebook_sizes", [self.num_codes]))

    @property
    def num_classes(self) -> int:
        return int(self.manifest["dataset"]["num_classes"])

    @property
    def latent_mean(self) -> np.ndarray:
        """float64 [D'] over every written latent (flips included)."""
        return np.asarray(self.manifest["latent_mean"], np.float64)

    @property
    def latent_std(self) -> np.ndarray:
        return np.asarray(self.manifest["latent_std"], np.float64)

    @property
    def has_flips(self) -> bool:
        return bool(self.manifest["flip"])

    @property
    def tokenizer_dir(self) -> str:
        """Where the encoding tokenizer was read from (it decodes generated tokens)."""
        return self.manifest["tokenizer_dir"]

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        """num_codes, embed_dim, downsample, resolution, quantizer and the tokenizer's whole `config`."""
        return self.manifest["tokenizer"]

    def read(self, name: str, images: np.ndarray) -> np.ndarray:
        """Rows `images` (image indices, any order, repeats allowed) of the arrays `name` ("tokens", "latents",
        "tokens_flip", "latents_flip"), as stored."""
        unique, inverse = np.unique(np.asarray(images, np.int64), return_inverse=True)
        shard_of = np.searchsorted(self.offsets, unique, side="right") - 1
        arrays = self.shards[name]
        out = np.empty((unique.size, *arrays[0].shape[1:]), arrays[0].dtype)
        for s in np.unique(shard_of):
            rows = shard_of == s
            out[rows] = arrays[s][unique[rows] - self.offsets[s]]
        return out[inverse]


def open_encoded(directory: str | os.PathLike) -> EncodedDataset:
    """The encoded dataset in `directory`. Raises naming the folder or file when the encoding is unfinished, a
    shard file is missing, has another size or shape, or a token shard holds an index outside [0, num_codes)."""
    directory = pathlib.Path(directory)
    manifest = shards_lib.read_manifest(encoded_job(False), directory)
    if manifest.get("format") != FORMAT or "flip" not in manifest:
        raise ValueError(f"{directory / shards_lib.MANIFEST_NAME} is not an encoded dataset of format {FORMAT} "
                         f"(format {manifest.get('format')!r}); write it with: {COMMAND}")
    job = encoded_job(manifest["flip"])
    manifest = shards_lib.open_complete(job, directory)
    entries = [s for s in manifest["shards"] if s["images"] > s["skipped"]]
    if not entries:
        raise ValueError(f"the encoded dataset in {directory} holds no images (all {manifest['skipped']} were "
                         f"unreadable)")
    sizes = _codebook_sizes(directory, manifest)
    row_shapes = {"tokens": tuple(manifest["token_shape"]), "latents": tuple(manifest["latent_shape"]), "labels": ()}
    shards: dict[str, list[np.ndarray]] = {name: [] for name in job.files}
    for entry in entries:
        rows = entry["images"] - entry["skipped"]
        for name in job.files:
            path = directory / entry[name]["file"]
            array = np.load(path, mmap_mode="r")
            want = (rows, *row_shapes[name.removesuffix("_flip")])
            if array.shape != want:
                raise ValueError(f"encoded shard {path}: shape {array.shape}, the manifest says {want}")
            if name.startswith("tokens"):
                _check_token_range(path, array, sizes)
            shards[name].append(array)
    labels = np.concatenate([np.asarray(a, np.int32) for a in shards.pop("labels")])
    offsets = np.cumsum([0] + [len(a) for a in shards["tokens"]])
    return EncodedDataset(directory, manifest, labels, shards, offsets)


def _codebook_sizes(directory: pathlib.Path, manifest: dict) -> tuple[int, ...]:
    """Sub-codebook sizes of the manifest, checked against its token shape ([h, w] for one, [k, h, w] for k)."""
    info = manifest["tokenizer"]
    sizes = tuple(int(n) for n in info.get("codebook_sizes", [info["num_codes"]]))
    shape = list(manifest["token_shape"])
    if len(sizes) != int(info.get("num_codebooks", 1)) or len(shape) != (2 if len(sizes) == 1 else 3) or (
            len(sizes) > 1 and shape[0] != len(sizes)):
        raise ValueError(f"{directory / shards_lib.MANIFEST_NAME}: token_shape {shape} does not fit the "
                         f"tokenizer's {info.get('num_codebooks', 1)} sub-codebook(s) of sizes {list(sizes)}")
    return sizes


def _check_token_range(path: pathlib.Path, tokens: np.ndarray, sizes: tuple[int, ...]) -> None:
    """Every token of sub-codebook j (axis 1 of [n, k, h, w] shards; the whole [n, h, w] shard for one) in
    [0, sizes[j])."""
    bad = out_of_range(tokens, sizes)
    if bad is not None:
        j, lo, hi = bad
        which = "" if len(sizes) == 1 else f" of sub-codebook {j + 1} of {len(sizes)}"
        raise ValueError(f"token shard {path} holds the index {lo if lo < 0 else hi}{which}, outside [0, {sizes[j]}) "
                         "(the encoding tokenizer's codebook size): the shard is corrupt or was written by another "
                         "tokenizer")


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """This process's share of global batch `step`: `tokens` int32 [B, h, w] ([B, k, h, w] for k sub-codebooks),
    `latents` float32 [B, h, w, D'], `label` int32 [B] (None when not among the pipeline's fields), `index` int64
    [B] (image index), `flipped` bool [B], `mask` bool [B] (False on the padding of an evaluation pass);
    `end_of_epoch` marks the last batch of `epoch`."""

    step: int
    epoch: int
    end_of_epoch: bool
    tokens: np.ndarray | None
    latents: np.ndarray | None
    label: np.ndarray | None
    index: np.ndarray
    flipped: np.ndarray
    mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class EncodedPipeline:
    """Iterable of `EncodedBatch`es from `start_step` to the end of epoch `num_epochs` (forever when None). Build
    with `make_encoded_pipeline`."""

    dataset: EncodedDataset
    batches: BatchOrder
    fields: tuple[str, ...]
    start_step: int
    num_epochs: int | None

    def __iter__(self) -> Iterator[EncodedBatch]:
        n = self.dataset.num_images
        for step, examples, mask in self.batches.indexed_steps(self.start_step, self.num_epochs):
            index, flipped = examples % n, examples >= n
            yield EncodedBatch(
                step=step, epoch=self.batches.epoch(step), end_of_epoch=self.batches.end_of_epoch(step),
                tokens=self._read("tokens", index, flipped) if "tokens" in self.fields else None,
                latents=(self._read("latents", index, flipped).astype(np.float32) if "latents" in self.fields
                         else None),
                label=self.dataset.labels[index] if "label" in self.fields else None,
                index=index, flipped=flipped, mask=mask)

    def _read(self, name: str, index: np.ndarray, flipped: np.ndarray) -> np.ndarray:
        out = self.dataset.read(name, index)
        if flipped.any():
            out[flipped] = self.dataset.read(f"{name}_flip", index[flipped])
        return out


def make_encoded_pipeline(dataset: EncodedDataset, *, global_batch_size: int, seed: int, train: bool,
                          process_index: int = 0, process_count: int = 1, start_step: int = 0,
                          fields: Sequence[str] = ("tokens", "label"), use_flips: bool = True,
                          num_epochs: int | None = None, drop_remainder: bool | None = None) -> EncodedPipeline:
    """Batches of `dataset` for this process (see the module docstring), carrying `fields` (of "tokens",
    "latents", "label").

    train=True: reshuffled every epoch, forever unless `num_epochs`, remainder dropped by default.
    train=False: dataset order, one pass unless `num_epochs`, last batch padded and masked by default.
    `use_flips`: read the flipped copies too when the dataset has them (a dataset without flips reads its images).
    """
    fields = tuple(fields)
    if not fields or set(fields) - set(FIELDS):
        raise ValueError(f"fields={fields}: choose among {FIELDS}")
    num_examples = dataset.num_images * (2 if use_flips and dataset.has_flips else 1)
    batches = BatchOrder.for_split(num_examples, global_batch_size=global_batch_size, seed=seed, train=train,
                                   process_index=process_index, process_count=process_count,
                                   drop_remainder=drop_remainder)
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    return EncodedPipeline(dataset, batches, fields, start_step,
                           1 if num_epochs is None and not train else num_epochs)
