"""The torch-free `.pth` reader: the official fixture, synthetic `torch.save` archives, errors and unpickling safety."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from vqlc_jax.convert.torch_file import Placeholder, load_torch_file, state_dict_from_checkpoint

# ---------------------------------------------------------------------------------------------------------------
# A minimal `torch.save` writer (no torch): the same zip records and pickle opcodes as torch's own output.

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


@dataclasses.dataclass(frozen=True)
class TorchGlobal:
    """A torch global (`torch._utils._rebuild_tensor_v2`, `torch FloatStorage`, ...), pickled by name only."""

    module: str
    name: str

    def __call__(self, *args):  # pickle requires reduce callables to be callable
        raise NotImplementedError


class Storage:
    """A storage: a 1-D array saved as `data/<key>`; `untyped` saves it as bytes (`torch.storage.UntypedStorage`)."""

    def __init__(self, data: np.ndarray, untyped: bool = False):
        self.data, self.untyped = np.ascontiguousarray(data).reshape(-1), untyped


@dataclasses.dataclass
class Tensor:
    """`size`/`stride` view of a storage from `offset`, pickled as torch does (v3 with an explicit dtype)."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str | None = None

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        if self.dtype is None:
            return TorchGlobal("torch._utils", "_rebuild_tensor_v2"), args
        return TorchGlobal("torch._utils", "_rebuild_tensor_v3"), args + (TorchGlobal("torch", self.dtype),)


def tensor(array: np.ndarray) -> Tensor:
    """A contiguous tensor holding `array`."""
    array = np.asarray(array)
    return Tensor(Storage(array), 0, array.shape, tuple(s // array.itemsize for s in array.strides))


class _TorchPickler(pickle._Pickler):
    """Protocol-2 pickler writing storages as torch's persistent ids and `TorchGlobal`s as bare GLOBAL opcodes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: dict[int, tuple[str, Storage]] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        key = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))[0]
        if obj.untyped:
            return "storage", TorchGlobal("torch.storage", "UntypedStorage"), key, "cpu", obj.data.nbytes
        return "storage", TorchGlobal("torch", _STORAGE_NAMES[obj.data.dtype]), key, "cpu", obj.data.size

    def _save_global(self, obj: TorchGlobal):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[TorchGlobal] = _save_global


def write_archive(path, pkl: bytes, storages: dict[str, bytes] | None = None, byteorder: str = "little",
                  name: str = "archive"):
    """The zip records `torch.save` writes, around a given `data.pkl` and its storages' bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", pkl)
        z.writestr(f"{name}/.format_version", "1")
        z.writestr(f"{name}/.storage_alignment", "64")
        z.writestr(f"{name}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"{name}/data/{key}", data)
        z.writestr(f"{name}/version", "3\n")
        z.writestr(f"{name}/.data/serialization_id", "0123456789")


def save(obj, path, byteorder: str = "little"):
    """`torch.save(obj, path)` for objects whose tensors are `Tensor`s."""
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(obj)
    storages = {key: (s.data.byteswap() if byteorder == "big" else s.data).tobytes()
                for key, s in pickler.storages.values()}
    write_archive(path, buf.getvalue(), storages, byteorder)


def assert_same(got, want):
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return fixtures_dir / "official_vqgan_lc"


def test_official_checkpoint_matches_its_npz(official):
    ckpt = load_torch_file(official / "tiny_linear.pth")
    assert list(ckpt) == ["model", "epoch", "args"] and ckpt["epoch"] == 0
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].n_vision_words == 512
    state = state_dict_from_checkpoint(ckpt)
    with np.load(official / "tiny_linear.npz") as npz:
        want = {k.removeprefix("state_dict/"): npz[k] for k in npz.files if k.startswith("state_dict/")}
    assert set(state) == set(want)
    for key, array in want.items():
        assert_same(state[key], array)
    assert state["discriminator.main.3.num_batches_tracked"].dtype == np.int64


def test_strides_offsets_shared_storage_and_dtypes(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    shared = tensor(base)
    half = np.linspace(-2, 2, 15, dtype=np.float16).reshape(3, 5)
    bf16 = np.linspace(-3, 3, 6).astype(ml_dtypes.bfloat16).reshape(2, 3)
    obj = {
        "transposed": Tensor(shared.storage, 0, (6, 4), (1, 6)),
        "view": Tensor(shared.storage, 8, (3, 3), (6, 1)),
        "row": Tensor(shared.storage, 12, (6,), (1,)),
        "base": shared,
        "broadcast": Tensor(Storage(np.arange(3, dtype=np.float64)), 0, (2, 3), (0, 1)),
        "half": tensor(half),
        "bf16_t": Tensor(Storage(bf16), 0, (3, 2), (1, 3)),
        "bool": tensor(np.array([[True, False], [False, True]])),
        "int64_scalar": tensor(np.array(7, np.int64)),
        "ints": [tensor(np.arange(-3, 3, dtype=np.int8)), tensor(np.arange(5, dtype=np.int32)),
                 tensor(np.arange(4, dtype=np.uint8))],
        "uint16_v3": Tensor(Storage(np.arange(6, dtype=np.uint16), untyped=True), 1, (2, 2), (1, 2), "uint16"),
        "empty": Tensor(Storage(np.zeros(0, np.float32)), 0, (0, 3), (3, 1)),
        "ordered": collections.OrderedDict([("b", tensor(np.ones(2, np.float32))), ("a", (1, [None, "x"]))]),
        "nested": {"list": [tensor(np.zeros((1, 2), np.float32)), {"t": (tensor(np.full(1, 5, np.int64)),)}]},
        "numpy": {"array": np.arange(6.0).reshape(2, 3), "scalar": np.float64(1.5), "bytes": b"\x00\xff"},
    }
    save(obj, tmp_path / "synthetic.pth")
    got = load_torch_file(tmp_path / "synthetic.pth")

    assert_same(got["transposed"], base.T)
    assert_same(got["view"], base[1:, 2:5])
    assert_same(got["row"], base[2])
    assert_same(got["base"], base)
    assert_same(got["broadcast"], np.broadcast_to(np.arange(3.0), (2, 3)))
    assert_same(got["half"], half)
    assert_same(got["bf16_t"], bf16.T)
    assert_same(got["bool"], np.array([[True, False], [False, True]]))
    assert_same(got["int64_scalar"], np.array(7, np.int64))
    for array, want in zip(got["ints"], (np.arange(-3, 3, dtype=np.int8), np.arange(5, dtype=np.int32),
                                         np.arange(4, dtype=np.uint8))):
        assert_same(array, want)
    assert_same(got["uint16_v3"], np.array([[1, 3], [2, 4]], np.uint16))
    assert_same(got["empty"], np.zeros((0, 3), np.float32))
    assert type(got["ordered"]) is collections.OrderedDict and list(got["ordered"]) == ["b", "a"]
    assert got["ordered"]["a"] == (1, [None, "x"])
    assert_same(got["nested"]["list"][1]["t"][0], np.full(1, 5, np.int64))
    assert_same(got["numpy"]["array"], np.arange(6.0).reshape(2, 3))
    assert got["numpy"]["scalar"] == np.float64(1.5) and got["numpy"]["bytes"] == b"\x00\xff"
    # Views of one storage come back as independent, writable, C-contiguous copies.
    got["base"][2, 0] = -1
    assert got["row"][0] == 12 and got["view"].flags.c_contiguous and got["transposed"].flags.writeable


def test_big_endian_archive(tmp_path):
    values = {"f": np.linspace(0, 1, 5, dtype=np.float32), "b": np.arange(4).astype(ml_dtypes.bfloat16),
              "i": np.arange(3, dtype=np.int64)}
    save({k: tensor(v) for k, v in values.items()}, tmp_path / "big.pth", byteorder="big")
    got = load_torch_file(tmp_path / "big.pth")
    for key, want in values.items():
        assert_same(got[key], want)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_torch_file(tmp_path / "nothere.pth")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04garbage", b""])
def test_garbage_file(tmp_path, content):
    (tmp_path / "junk.pth").write_bytes(content)
    with pytest.raises(ValueError, match="junk.pth"):
        load_torch_file(tmp_path / "junk.pth")


def test_zip_without_pickle_and_truncated_storage(tmp_path):
    np.savez(tmp_path / "arrays.npz", a=np.ones(2))
    with pytest.raises(ValueError, match="arrays.npz(.|\n)*data.pkl"):
        load_torch_file(tmp_path / "arrays.npz")
    buf = io.BytesIO()
    _TorchPickler(buf).dump({"w": tensor(np.ones(4, np.float32))})
    write_archive(tmp_path / "short.pth", buf.getvalue(), {"0": b"\x00" * 8})
    with pytest.raises(ValueError, match="short.pth(.|\n)*storage 0"):
        load_torch_file(tmp_path / "short.pth")


def test_tensor_overrunning_its_storage_is_refused(tmp_path):
    save({"w": Tensor(Storage(np.ones(4, np.float32)), 2, (2, 2), (2, 1))}, tmp_path / "overrun.pth")
    with pytest.raises(ValueError, match="overrun.pth(.|\n)*overruns"):
        load_torch_file(tmp_path / "overrun.pth")


def test_legacy_format_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, even where it is installed
    legacy = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b".\x80\x02M\xe9\x03."
    (tmp_path / "old.pth").write_bytes(legacy)
    with pytest.raises(ValueError, match=r"old.pth(.|\n)*legacy(.|\n)*torch>=1\.6(.|\n)*install torch"):
        load_torch_file(tmp_path / "old.pth")


def test_unknown_globals_are_inert_placeholders(tmp_path):
    marker = tmp_path / "pwned"
    pkl = (
        b"\x80\x02}(X\x03\x00\x00\x00cmd"
        + b"cos\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode() + b"\x85R"
        + b"X\x04\x00\x00\x00evalcbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R"
        + b"X\x03\x00\x00\x00cfgc__main__\nConfig\n)\x81}X\x02\x00\x00\x00lrG?\xb9\x99\x99\x99\x99\x99\x9asb"
        + b"u."
    )
    write_archive(tmp_path / "evil.pth", pkl)
    got = load_torch_file(tmp_path / "evil.pth")
    assert not marker.exists()
    assert isinstance(got["cmd"], Placeholder) and got["cmd"].qualname == "os.system"
    assert got["cmd"].args == (f"touch {marker}",)
    assert got["eval"].qualname == "builtins.eval" and got["eval"].args == ("print('hi')",)
    assert got["cfg"].qualname == "__main__.Config" and got["cfg"].state == {"lr": 0.1}


def test_storage_of_an_unknown_type_is_refused(tmp_path):
    pkl = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nQInt8Storage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ."
    write_archive(tmp_path / "q.pth", pkl, {"0": b"\x01"})
    with pytest.raises(ValueError, match="q.pth(.|\n)*torch.QInt8Storage"):
        load_torch_file(tmp_path / "q.pth")


def test_state_dict_from_checkpoint():
    w, b = np.ones(2), np.zeros(1)
    assert state_dict_from_checkpoint({"w": w}) == {"w": w}
    assert state_dict_from_checkpoint({"module.a.w": w, "module.b": b}) == {"a.w": w, "b": b}
    assert list(state_dict_from_checkpoint({"module.a": w, "b": b})) == ["module.a", "b"]
    nested = {"model": {"note": "not arrays"}, "state_dict": {"module.w": w}, "ema": {"w": b}, "epoch": 3}
    assert state_dict_from_checkpoint(nested) == {"w": w}
    assert state_dict_from_checkpoint(nested, keys=("ema",)) == {"w": b}
    with pytest.raises(ValueError, match=r"\['optimizer', 'epoch'\]"):
        state_dict_from_checkpoint({"optimizer": {}, "epoch": 3})


def test_matches_real_torch_files(tmp_path):
    """Where torch is installed: its own `torch.save` output (zip and legacy) reads back bit-exactly."""
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "t": base.t(), "view": base[1:, 2:5], "base": base, "bf16": torch.randn(3, 5).bfloat16().t(),
        "f16": torch.randn(2, 3).half(), "bool": torch.rand(3) > 0.5, "i64": torch.tensor(7),
        "param": torch.nn.Parameter(torch.ones(2, 3)), "expand": torch.ones(3).expand(4, 3),
    }
    want = {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in tensors.items()}
    for legacy in (False, True):
        path = tmp_path / f"real_{legacy}.pth"
        torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
        got = load_torch_file(path)
        for key, array in want.items():
            np.testing.assert_array_equal(got[key].astype(array.dtype), array)
            assert got[key].shape == array.shape
        assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["i64"].dtype == np.int64
