"""Reading torch.save checkpoints without torch, and refusing pickles that ask for more than tensors."""

import collections
import io
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_i2v.errors import UnsafeCheckpointError, WeightLoadError
from mlx_i2v.pth import read_pth

REPO = Path(__file__).resolve().parents[1]

_MX_DTYPES = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
    torch.float64: mx.float32,
    torch.int64: mx.int64,
    torch.int32: mx.int32,
    torch.uint8: mx.uint8,
    torch.bool: mx.bool_,
}


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(2, 3, 4, generator=g).half(),
        "bf16": torch.randn(7, 5, generator=g).bfloat16(),
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous, saved as is
        "permuted_bf16": torch.randn(2, 3, 4, generator=g).bfloat16().permute(2, 0, 1),
        "rows_a": base[1:3],  # these three share one storage, at different offsets
        "rows_b": base[4:],
        "column": base[:, 2],
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "steps": torch.tensor(17),
        "ids": torch.arange(5, dtype=torch.int32),
        "bytes": torch.arange(4, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same(got: dict[str, mx.array], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        a = got[name]
        assert a.shape == tuple(t.shape), name
        assert a.dtype == _MX_DTYPES[t.dtype], name
        if t.dtype.is_floating_point:
            np.testing.assert_array_equal(np.array(a.astype(mx.float32)), t.float().numpy(), err_msg=name)
        else:
            np.testing.assert_array_equal(np.array(a), t.numpy(), err_msg=name)


def test_reads_dtypes_views_and_shared_storages(tmp_path):
    sd = _mixed_state_dict()
    assert sd["rows_a"].untyped_storage().data_ptr() == sd["column"].untyped_storage().data_ptr()
    path = tmp_path / "mixed.pth"
    torch.save(sd, path)
    _assert_same(read_pth(path), sd)


def test_reads_legacy_format(tmp_path):
    sd = _mixed_state_dict()
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    _assert_same(read_pth(str(path)), sd)


def test_reads_module_state_dict_and_parameters(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.LayerNorm(3))
    sd = model.state_dict()
    path = tmp_path / "module.pth"
    torch.save(sd, path)
    _assert_same(read_pth(path), dict(sd))

    # nn.Parameter objects saved directly pickle through torch._utils._rebuild_parameter.
    params = dict(model.named_parameters())
    torch.save(params, path)
    _assert_same(read_pth(path), {k: v.detach() for k, v in params.items()})


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_unwraps_a_one_entry_wrapper(tmp_path, wrapper):
    sd = _mixed_state_dict()
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: sd}, path)
    _assert_same(read_pth(path), sd)


@pytest.mark.parametrize("obj", [
    {"model": {"w": torch.ones(2)}, "epoch": 3},
    {"w": torch.ones(2), "note": "hello"},
    [torch.ones(2)],
    {"outer": {"inner": {"w": torch.ones(2)}}},
])
def test_rejects_other_layouts(tmp_path, obj):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(WeightLoadError, match="expected a dict of tensors") as err:
        read_pth(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert str(path) in str(err.value)


def test_arrays_are_copies_of_the_mapped_file(tmp_path):
    sd = {"w": torch.arange(12.0).reshape(3, 4), "t": torch.arange(6.0).reshape(2, 3).t()}
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    got = read_pth(path)
    with open(path, "r+b") as f:  # scribble over the file the arrays were mapped from
        f.write(b"\0" * path.stat().st_size)
    _assert_same(got, sd)


def _byteswapped_copy(src: Path, dst: Path) -> None:
    """Rewrite a torch.save archive as a big-endian writer would have (Python's zipfile does not align
    members, so this also exercises unaligned storages)."""
    with zipfile.ZipFile(src) as zin:
        pkl = next(n for n in zin.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        itemsizes = _storage_itemsizes(zin.read(pkl))
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                data = zin.read(info)
                rel = info.filename[len(prefix):]
                if rel == "byteorder":
                    data = b"big"
                elif rel.startswith("data/"):
                    key = rel[len("data/"):]
                    data = np.frombuffer(data, f"<u{itemsizes[key]}").byteswap().tobytes() \
                        if itemsizes[key] > 1 else data
                zout.writestr(info.filename, data)


def _storage_itemsizes(pkl: bytes) -> dict[str, int]:
    """Element size per storage key, read from the persistent ids in a data.pkl."""
    sizes: dict[str, int] = {}

    class Spy(pickle.Unpickler):
        def persistent_load(self, pid):
            _, storage_type, key, _, _ = pid
            with warnings.catch_warnings():  # TypedStorage.dtype warns that typed storages are deprecated
                warnings.simplefilter("ignore")
                sizes[key] = storage_type.dtype.itemsize
            return None

        def find_class(self, module, name):
            if name.startswith("_rebuild"):
                return lambda *args, **kwargs: None
            return super().find_class(module, name)

    Spy(io.BytesIO(pkl)).load()
    return sizes


def test_reads_big_endian_archive(tmp_path):
    sd = _mixed_state_dict()
    little, big = tmp_path / "little.pth", tmp_path / "big.pth"
    torch.save(sd, little)
    _byteswapped_copy(little, big)
    _assert_same(read_pth(big), sd)


# --- refusing code -----------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _write_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> None:
    """A zip laid out like torch.save's, with a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("payload", [_Evil, _EvilEval])
def test_refuses_code_saved_with_torch_save(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="system|eval") as err:
        read_pth(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refuses_code_in_hand_written_zip(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write_zip(path, pickle.dumps({"x": _Evil(marker)}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os|nt)\.system'"):
        read_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("payload", [_Evil, _EvilEval])
def test_refuses_code_in_plain_pickle(tmp_path, protocol, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(payload(marker), protocol=protocol))
    with pytest.raises(UnsafeCheckpointError):
        read_pth(path)
    assert not marker.exists()


def test_refuses_code_in_legacy_body(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"x": _Evil(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError):
        read_pth(path)
    assert not marker.exists()


# --- hand-crafted tensor records ---------------------------------------------------------------------


class _StorageRef:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _TensorRecord:
    """Pickles exactly as torch.save writes a tensor, with whatever offset/shape/stride we choose."""

    def __init__(self, storage: _StorageRef, offset: int, shape: tuple, stride: tuple):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _crafted(path: Path, tensors: dict, storages: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(tensors)
    _write_zip(path, buf.getvalue(), storages)


def test_crafted_record_matches_torch(tmp_path):
    path = tmp_path / "ok.pth"
    data = np.arange(12, dtype="<f4")
    _crafted(path, {"w": _TensorRecord(_StorageRef("0", 12), 2, (2, 3), (1, 4))}, {"0": data.tobytes()})
    want = torch.from_numpy(data.copy()).as_strided((2, 3), (1, 4), 2)
    _assert_same(read_pth(path), {"w": want})


@pytest.mark.parametrize("offset, shape, stride, storage_numel, nbytes, match", [
    (0, (4, 4), (4, 1), 12, 48, "past its storage"),  # view reads beyond the storage
    (11, (2,), (1,), 12, 48, "past its storage"),
    (0, (1000, 1000), (0, 0), 12, 48, "broadcast view"),  # a stride-0 memory bomb
    (0, (3,), (-1,), 12, 48, "non-negative"),
    (0, (3,), (1,), 12, 8, "has 8 bytes"),  # storage member shorter than declared
])
def test_rejects_out_of_bounds_views(tmp_path, offset, shape, stride, storage_numel, nbytes, match):
    path = tmp_path / "bad.pth"
    record = _TensorRecord(_StorageRef("0", storage_numel), offset, shape, stride)
    _crafted(path, {"w": record}, {"0": bytes(nbytes)})
    with pytest.raises(WeightLoadError, match=match):
        read_pth(path)


def test_rejects_missing_storage_member(tmp_path):
    path = tmp_path / "bad.pth"
    _crafted(path, {"w": _TensorRecord(_StorageRef("7", 3), 0, (3,), (1,))}, {})
    with pytest.raises(WeightLoadError, match="data/7 is missing"):
        read_pth(path)


# --- broken files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file_raises_weight_load_error(tmp_path, legacy, fraction):
    path = tmp_path / "cut.pth"
    torch.save(_mixed_state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(WeightLoadError) as err:
        read_pth(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"hello, this is not a checkpoint", "not a PyTorch checkpoint"),
    (pickle.dumps({"w": [1.0, 2.0]}), "not a PyTorch checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(WeightLoadError, match=match):
        read_pth(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightLoadError, match="cannot read"):
        read_pth(tmp_path / "nope.pth")


# --- no torch needed ---------------------------------------------------------------------------------


def test_reads_without_torch(tmp_path):
    sd = _mixed_state_dict()
    path, out = tmp_path / "mixed.pth", tmp_path / "out.npz"
    torch.save(sd, path)
    script = f"""
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import mlx.core as mx, numpy as np
from mlx_i2v.pth import read_pth
got = read_pth({str(path)!r})
assert not any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v is not None)
np.savez({str(out)!r}, **{{k: np.array(v.astype(mx.float32)) for k, v in got.items()}})
print(" ".join(f"{{k}}:{{v.dtype}}" for k, v in got.items()))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    dtypes = dict(item.split(":") for item in proc.stdout.split())
    assert dtypes["bf16"] == "mlx.core.bfloat16" and dtypes["f16"] == "mlx.core.float16"
    with np.load(out) as arrays:
        for name, t in sd.items():
            np.testing.assert_array_equal(arrays[name], t.float().numpy(), err_msg=name)
