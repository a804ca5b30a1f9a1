"""Data sources, transforms and the sharded, resumable pipeline (vqlc_jax.data)."""

import io
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from vqlc_jax.data import Record, bundled, imagenet, make_pipeline, make_source
from vqlc_jax.data.transforms import crop_offset, decode_image, resize_crop, to_float


def _encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def _image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _collect(pipeline) -> list:
    return list(pipeline)


# --- bundled -------------------------------------------------------------------------------------------------

def test_bundled_photos_match_the_library_loaders():
    from skimage import data
    from sklearn.datasets import load_sample_image

    np.testing.assert_array_equal(bundled.load_photo("astronaut"), data.astronaut())
    np.testing.assert_array_equal(bundled.load_photo("motorcycle"), data.stereo_motorcycle()[0])
    np.testing.assert_array_equal(bundled.load_photo("china"), load_sample_image("china.jpg"))


def test_bundled_size_shape_range_and_cold_build_time():
    bundled.load_photo.cache_clear()
    bundled._build.cache_clear()
    start = time.perf_counter()
    train, val = (make_source("bundled", split, {"resolution": 48}) for split in ("train", "validation"))
    assert time.perf_counter() - start < 2.0
    assert len(train) > 1000 and len(val) > 200
    for source in (train, val):
        image, label, key = source[len(source) - 1]
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        assert key.startswith(bundled.PHOTOS[label] + "/")
        assert {c.photo for c in source.crops} == set(range(len(bundled.PHOTOS)))
        assert source.images.std() > 20  # real photo content, not blank crops


def test_bundled_is_deterministic():
    first = make_source("bundled", "validation", {"resolution": 32, "stride": 0.6})
    images, keys = first.images.copy(), [first[i].key for i in range(len(first))]
    bundled._build.cache_clear()
    bundled.load_photo.cache_clear()
    second = make_source("bundled", "validation", {"resolution": 32, "stride": 0.6})
    np.testing.assert_array_equal(second.images, images)
    assert [second[i].key for i in range(len(second))] == keys


def test_bundled_train_and_validation_share_no_pixel():
    train, val = (bundled.BundledSource(split, resolution=32) for split in ("train", "validation"))
    assert not {train[i].key for i in range(len(train))} & {val[i].key for i in range(len(val))}
    for photo, name in enumerate(bundled.PHOTOS):
        height, width = bundled.load_photo(name).shape[:2]
        covered = {}
        for split, source in (("train", train), ("validation", val)):
            mask = np.zeros((height, width), bool)
            for crop in source.crops:
                if crop.photo == photo:
                    assert crop.top >= 0 and crop.left >= 0
                    assert crop.top + crop.size <= height and crop.left + crop.size <= width
                    mask[crop.top:crop.top + crop.size, crop.left:crop.left + crop.size] = True
            covered[split] = mask
        assert covered["validation"].any() and not (covered["train"] & covered["validation"]).any(), name


# --- folder --------------------------------------------------------------------------------------------------

def test_folder_classes_sorted_files_sorted_and_flat_layout(tmp_path):
    for cls, names in (("zebra", ["b.png", "a.JPG"]), ("apple", ["c.jpeg", "notes.txt", ".hidden.jpg"]),
                       ("mango", ["10.webp", "2.png"])):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for name in names:
            fmt = {"png": "PNG", "webp": "WEBP"}.get(name.rsplit(".", 1)[1].lower(), "JPEG")
            (tmp_path / "train" / cls / name).write_bytes(_encode(_image(len(name)), fmt))
    source = make_source("folder", "train", {"root": tmp_path})
    assert source.class_names == ("apple", "mango", "zebra") and source.num_classes == 3
    records = [source[i] for i in range(len(source))]
    assert [r.key for r in records] == ["apple/c.jpeg", "mango/10.webp", "mango/2.png", "zebra/a.JPG", "zebra/b.png"]
    assert [r.label for r in records] == [0, 1, 1, 2, 2]
    assert decode_image(records[2].image).shape == (40, 56, 3)

    (tmp_path / "ffhq").mkdir()
    for name in ("00002.png", "00001.png"):
        (tmp_path / "ffhq" / name).write_bytes(_encode(_image(0), "PNG"))
    flat = make_source("folder", "ffhq", {"root": tmp_path})
    assert [flat[i][1:] for i in range(len(flat))] == [(0, "00001.png"), (0, "00002.png")]


def test_folder_errors_name_the_path(tmp_path):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "train" / "loose.jpg").write_bytes(_encode(_image(0)))
    with pytest.raises(FileNotFoundError, match="val"):
        make_source("folder", "val", {"root": tmp_path})
    with pytest.raises(ValueError, match="loose.jpg"):
        make_source("folder", "train", {"root": tmp_path})
    with pytest.raises(ValueError, match="rooot"):
        make_source("folder", "train", {"rooot": tmp_path})
    with pytest.raises(ValueError, match="nope"):
        make_source("nope", "train")


# --- transforms ----------------------------------------------------------------------------------------------

def _gradient(height: int, width: int) -> np.ndarray:
    """R = column, G = row: a crop's values give back its source coordinates."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([cols, rows, np.zeros_like(rows)], -1).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_crop_geometry_on_a_gradient(seed):
    image = _gradient(100, 200)  # smaller side 100 -> 50: scale 0.5, resized 50 x 100
    top, left, scale = crop_offset(100, 200, 50, np.random.default_rng(seed))
    assert scale == 0.5 and top == 0 and 0 <= left <= 50
    out = resize_crop(image, 50, np.random.default_rng(seed))
    naive = np.asarray(Image.fromarray(image).resize((100, 50), Image.BICUBIC))[top:top + 50, left:left + 50]
    np.testing.assert_array_equal(out, naive)  # one box resize == resize the whole image, then crop
    inner = out[5:-5, 5:-5].astype(float)  # away from the clamped borders
    cols = np.arange(5, 45)
    np.testing.assert_allclose(inner[..., 0], np.broadcast_to((left + cols + 0.5) / scale - 0.5, (40, 40)), atol=1)
    np.testing.assert_allclose(inner[..., 1].T, np.broadcast_to((cols + 0.5) / scale - 0.5, (40, 40)), atol=1)


def test_random_crops_cover_the_range_and_eval_crop_is_centred():
    lefts = {crop_offset(100, 200, 50, np.random.default_rng(s))[1] for s in range(200)}
    assert min(lefts) <= 2 and max(lefts) >= 48 and len(lefts) > 30
    out = resize_crop(_gradient(100, 200), 50).astype(float)
    mirrored = out[10:-10, 10:40, 0] + out[10:-10, 39:9:-1, 0]  # x and its mirror sum to 2 * centre = 199
    np.testing.assert_allclose(mirrored, 199, atol=1)
    tall = resize_crop(_gradient(120, 60), 30).astype(float)  # scale 0.5, rows centred
    np.testing.assert_allclose(tall[5:25, 5:-5, 1] + tall[24:4:-1, 5:-5, 1], 119, atol=1)


def test_decode_and_scale():
    np.testing.assert_array_equal(to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    gray = decode_image(np.full((4, 5), 7, np.uint8))
    assert gray.shape == (4, 5, 3) and (gray == 7).all()
    assert decode_image(np.zeros((3, 2, 1), np.uint8)).shape == (3, 2, 3)
    rgba = np.concatenate([_image(1, 4, 4), np.zeros((4, 4, 1), np.uint8)], -1)
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG")), rgba[..., :3])
    with pytest.raises(Exception):
        decode_image(b"")


# --- pipeline ------------------------------------------------------------------------------------------------

class ToySource:
    """In-memory source of landscape and portrait images, so that random crops move."""

    num_classes = 5

    def __init__(self, n: int):
        self.images = [_image(i, *((24, 40) if i % 2 else (44, 20))) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Record:
        return Record(self.images[index], index % 5, f"toy/{index}")


@pytest.fixture(scope="module")
def small():
    """299 validation crops at 32 px."""
    return make_source("bundled", "validation", {"resolution": 32})


@pytest.fixture(scope="module")
def toy():
    return ToySource(150)


def _same(a, b) -> None:
    assert (a.step, a.epoch, a.end_of_epoch, a.keys) == (b.step, b.epoch, b.end_of_epoch, b.keys)
    for name, value in a.arrays().items():
        np.testing.assert_array_equal(value, b.arrays()[name], err_msg=name)


def test_pipeline_batches_epochs_and_determinism(toy):
    kwargs = dict(resolution=24, global_batch_size=32, train=True, num_epochs=2)
    run = _collect(make_pipeline(toy, seed=3, **kwargs))
    steps = len(toy) // 32
    assert len(run) == 2 * steps and [b.step for b in run] == list(range(2 * steps))
    assert [b.step for b in run if b.end_of_epoch] == [steps - 1, 2 * steps - 1]
    first = run[0]
    assert first.image.shape == (32, 24, 24, 3) and first.image.dtype == np.float32
    assert -1 <= first.image.min() and first.image.max() <= 1 and first.mask.all()
    for epoch in range(2):
        seen = np.concatenate([b.index for b in run if b.epoch == epoch])
        assert len(np.unique(seen)) == len(seen) == steps * 32  # a permutation, remainder dropped
    assert not np.array_equal(run[0].index, run[steps].index)  # reshuffled each epoch
    assert [toy[i].label for i in first.index] == list(first.label)
    for a, b in zip(run, _collect(make_pipeline(toy, seed=3, num_workers=1, prefetch=0, **kwargs))):
        _same(a, b)
    other = next(iter(make_pipeline(toy, seed=4, **kwargs)))
    assert not np.array_equal(other.index, first.index)
    crops = [{int(i): b.image[j] for b in run if b.epoch == e for j, i in enumerate(b.index)} for e in (0, 1)]
    moved = [not np.array_equal(crops[0][i], crops[1][i]) for i in crops[0].keys() & crops[1].keys()]
    assert np.mean(moved) > 0.8  # crop positions are drawn anew each epoch


def test_pipeline_resumes_at_any_step(toy):
    kwargs = dict(resolution=16, global_batch_size=40, seed=11, train=True, num_epochs=3)
    full = _collect(make_pipeline(toy, **kwargs))
    resume_at = len(full) // 3 + 1  # mid-epoch, the rest crosses an epoch boundary
    assert 0 < resume_at % (len(full) // 3)
    resumed = _collect(make_pipeline(toy, start_step=resume_at, **kwargs))
    assert len(resumed) == len(full) - resume_at
    for a, b in zip(full[resume_at:], resumed):
        _same(a, b)


def test_two_processes_read_disjoint_halves_of_the_global_batch(toy):
    kwargs = dict(resolution=16, global_batch_size=16, seed=5, train=True, num_epochs=1)
    whole = _collect(make_pipeline(toy, **kwargs))[:6]
    halves = [_collect(make_pipeline(toy, process_index=p, process_count=2, **kwargs))[:6] for p in range(2)]
    for step, batch in enumerate(whole):
        parts = [halves[p][step] for p in range(2)]
        assert all(part.image.shape[0] == 8 for part in parts)
        assert not set(parts[0].index) & set(parts[1].index)
        for name in ("image", "label", "index", "mask"):
            np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(batch, name))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_pass_covers_each_example_once(small, process_count):
    batches = [b for p in range(process_count) for b in make_pipeline(
        small, resolution=32, global_batch_size=64, seed=0, train=False, process_index=p,
        process_count=process_count)]
    counted = np.concatenate([b.index[b.mask] for b in batches])
    np.testing.assert_array_equal(np.sort(counted), np.arange(len(small)))
    assert sum(b.image.shape[0] for b in batches) == 64 * 5  # 299 padded to 5 full batches
    last = max(b.step for b in batches)
    assert all(b.end_of_epoch == (b.step == last) for b in batches)
    if process_count == 1:
        np.testing.assert_array_equal(batches[0].index, np.arange(64))  # in order
        np.testing.assert_array_equal(batches[0].image[3], to_float(small[3].image))  # centre crop at 32 = as is


def test_unreadable_files_are_skipped_counted_and_masked(tmp_path):
    split = tmp_path / "val" / "cls"
    split.mkdir(parents=True)
    for i in range(7):
        (split / f"{i:02d}.jpg").write_bytes(_encode(_image(i)))
    (split / "03.jpg").write_bytes(_encode(_image(3))[:-400])  # truncated JPEG: header fine, data cut
    (split / "05.png").write_bytes(b"")  # zero bytes
    source = make_source("folder", "val", {"root": tmp_path})
    assert len(source) == 8
    pipeline = make_pipeline(source, resolution=16, global_batch_size=3, seed=0, train=False)
    batches = _collect(pipeline)
    assert pipeline.skipped.count == 2 and sorted(pipeline.skipped.errors) == [3, 6]  # 03.jpg, 05.png
    assert all(b.image.shape == (3, 16, 16, 3) for b in batches)
    index = np.concatenate([b.index for b in batches])
    mask = np.concatenate([b.mask for b in batches])
    keys = sum((b.keys for b in batches), ())
    np.testing.assert_array_equal(index[mask], [0, 1, 2, 4, 5, 7])
    assert keys[3] == "cls/04.jpg" and keys[6] == "cls/06.jpg"  # stand-ins: the next readable file
    train = make_pipeline(source, resolution=16, global_batch_size=4, seed=0, train=True, num_epochs=3)
    assert len(_collect(train)) == 6 and train.skipped.count == 2


def test_pipeline_argument_errors(small):
    with pytest.raises(ValueError, match="process_count=3"):
        make_pipeline(small, resolution=16, global_batch_size=16, seed=0, train=True, process_count=3)
    with pytest.raises(ValueError, match="global_batch_size=1000"):
        make_pipeline(small, resolution=16, global_batch_size=1000, seed=0, train=True)


# --- imagenet2012 (no download here: error paths, config plumbing, record adaptation) -----------------------

def test_imagenet_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not prepared.*python -m vqlc_jax.data.imagenet"):
        make_source("imagenet2012", "validation", {"data_dir": tmp_path})
    with pytest.raises(ValueError, match="'val'"):
        make_source("imagenet2012", "val", {"data_dir": tmp_path})
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
        imagenet.prepare(tmp_path, tmp_path / "out")
    for tar in imagenet.TARS:
        (tmp_path / tar).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install tensorflow-cpu==2\.21\.0"):
        imagenet.prepare(tmp_path, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install tensorflow-datasets==4\.9\.10"):
        make_source("imagenet2012", "train", {"data_dir": tmp_path})


def test_imagenet_records_from_a_prepared_split(monkeypatch):
    rows = [{"image": _encode(_image(i)), "label": i % 3, "file_name": f"n0{i}_1.JPEG".encode()} for i in range(5)]
    features = {"label": types.SimpleNamespace(num_classes=1000, names=[f"n{i:08d}" for i in range(1000)])}
    array_record = object()
    builder = types.SimpleNamespace(
        is_prepared=lambda: True, data_dir="/prepared",
        info=types.SimpleNamespace(file_format=array_record, features=features),
        as_data_source=lambda split, decoders: rows if split == "validation" else None)
    fake = types.SimpleNamespace(builder=lambda name, data_dir: builder,
                                 core=types.SimpleNamespace(FileFormat=types.SimpleNamespace(ARRAY_RECORD=array_record)),
                                 decode=types.SimpleNamespace(SkipDecoding=lambda: None))
    monkeypatch.setattr(imagenet, "_tfds", lambda: fake)
    source = make_source("imagenet2012", "validation", {"data_dir": "/prepared"})
    assert len(source) == 5 and source.num_classes == 1000
    assert source[4][1:] == (1, "n04_1.JPEG")
    batch = next(iter(make_pipeline(source, resolution=16, global_batch_size=8, seed=0, train=False)))
    assert batch.mask.tolist() == [True] * 5 + [False] * 3 and batch.keys[0] == "n00_1.JPEG"
