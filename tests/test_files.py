"""`rotorquant.save` / `rotorquant.load`: round trips on every tier, across processes, and every corruption."""

import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rotorquant as rq
from rotorquant import files
from tiers import TIERS, to_numpy

torch = pytest.importorskip("torch")
from safetensors import deserialize  # noqa: E402
from safetensors.numpy import save as safetensors_save  # noqa: E402

SPECS = {
    "rotor": rq.QuantizerSpec(dim=35, bits=3),
    "qjl-fp16": rq.QuantizerSpec(dim=20, bits=3, qjl=True, norm_dtype="float16", seed=4),
    "dense": rq.QuantizerSpec(dim=16, bits=8, rotation="dense"),
}


def _x(shape, dim, seed=0):
    return np.random.default_rng(seed).standard_normal((*shape, dim))


def _fields(code):
    """``{field: NumPy array}`` of the payload (dtypes kept)."""
    return {f: to_numpy(getattr(code, f), keep_dtype=True) for f in files.PAYLOAD_FIELDS if getattr(code, f) is not None}


def assert_same_code(got, want):
    assert got.spec == want.spec and got.dtype == want.dtype
    a, b = _fields(got), _fields(want)
    assert a.keys() == b.keys()
    for f in a:
        assert a[f].dtype == b[f].dtype and a[f].shape == b[f].shape, f
        assert a[f].tobytes() == b[f].tobytes(), f  # byte-exact (NaN-safe, sign of zero included)


# the Triton tier (slow: interpreted, or compiled per variant) takes one spec
CASES = [(t, name) for t in TIERS for name in SPECS if not t.slow or name == "rotor"]


@pytest.mark.parametrize("tier, name", CASES, ids=[f"{t.name}-{name}" for t, name in CASES])
def test_round_trip_is_byte_exact_on_every_tier(tier, name, tmp_path):
    spec = SPECS[name]
    params = rq.build_params(spec)
    code = tier.module.quantize(tier.array(_x((2, 3), spec.dim), "float32"), params)
    path = tmp_path / "code.safetensors"
    rq.save(path, code)
    as_numpy = rq.load(path)
    as_torch = rq.load(path, like=torch.empty(0))
    assert isinstance(as_numpy.codes, np.ndarray) and isinstance(as_torch.codes, torch.Tensor)
    assert as_numpy.calibration is None and as_torch.norms.device.type == "cpu"
    assert_same_code(as_numpy, code)
    assert_same_code(as_torch, code)
    # a code read back in another tier's arrays decodes there as the writing tier decodes it
    other = rq.tiers.numpy if tier.device is not None else rq.tiers.torch
    loaded = as_numpy if tier.device is not None else as_torch
    np.testing.assert_allclose(
        to_numpy(other.dequantize(loaded, params)), to_numpy(tier.module.dequantize(code, params)), atol=1e-5
    )
    rq.save(tmp_path / "again.safetensors", loaded)  # and writes the same bytes again
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_dict_round_trip_with_every_kind_of_entry(tmp_path):
    spec = SPECS["rotor"]
    x = _x((4, 7), spec.dim)
    calibration = rq.calibrate(x, rq.build_params(spec), axis=1, center=True)
    quantizer = rq.Quantizer(spec, "torch", calibration)
    codes = {
        "plain": rq.Quantizer(spec).quantize(x),
        "qjl": rq.Quantizer(SPECS["qjl-fp16"]).quantize(_x((3,), 20)),
        "calibrated/keys": quantizer.quantize(torch.tensor(x, dtype=torch.bfloat16)),
        "empty": rq.Quantizer(spec).quantize(np.zeros((0, spec.dim))),
    }
    path = tmp_path / "codes.safetensors"
    rq.save(path, codes)
    back = rq.load(path)
    assert list(back) == list(codes)
    for key in codes:
        assert_same_code(back[key], codes[key])
    cal = back["calibrated/keys"].calibration
    assert cal is not calibration and cal.same_as(calibration)
    np.testing.assert_array_equal(cal.center, calibration.center)
    # the quantizer that made the calibrated code decodes the loaded one exactly as the original
    torch_back = rq.load(path, like=torch.empty(0))
    torch.testing.assert_close(
        quantizer.dequantize(torch_back["calibrated/keys"]), quantizer.dequantize(codes["calibrated/keys"]), rtol=0, atol=0
    )
    rq.save(tmp_path / "none.safetensors", {})
    assert rq.load(tmp_path / "none.safetensors") == {}


def test_calibration_on_custom_parameters_is_refused(tmp_path):
    spec = SPECS["rotor"]
    custom = dataclasses.replace(rq.build_params(spec), centroids=rq.build_params(spec).centroids * 1.01)
    cal = rq.calibrate(_x((5,), spec.dim), custom, axis=0)
    code = rq.Quantizer(spec, "numpy", cal, params=custom).quantize(_x((2,), spec.dim))
    with pytest.raises(ValueError, match=r"codes.calibration: expected one fitted on build_params\(spec\)"):
        rq.save(tmp_path / "c.safetensors", code)
    assert not (tmp_path / "c.safetensors").exists()


def test_file_size_is_nbytes_plus_a_small_header(tmp_path):
    for shape in ((1,), (64, 32)):
        code = rq.Quantizer(SPECS["qjl-fp16"]).quantize(_x(shape, 20))
        path = tmp_path / "c.safetensors"
        rq.save(path, code)
        header = int.from_bytes(path.read_bytes()[:8], "little")
        assert os.path.getsize(path) == code.nbytes + 8 + header
        assert header <= 1024, header
    codes = {f"layer{i}": rq.Quantizer(SPECS["rotor"]).quantize(_x((2, 3), 35)) for i in range(10)}
    rq.save(path, codes)
    overhead = os.path.getsize(path) - sum(c.nbytes for c in codes.values())
    assert overhead <= 8 + 256 + 640 * len(codes), overhead


CHILD = """
import sys, numpy as np, rotorquant as rq
spec = rq.QuantizerSpec(dim=35, bits=3, seed=7)
code = rq.Quantizer(spec).quantize(np.random.default_rng(5).standard_normal((3, 4, 35)))
if sys.argv[1] == "save":
    rq.save(sys.argv[2], code)
else:
    back = rq.load(sys.argv[2])
    assert back.spec == spec and back.codes.tobytes() == code.codes.tobytes() and back.norms.tobytes() == code.norms.tobytes()
    print("same")
"""


def test_round_trip_across_processes(tmp_path):
    theirs, ours = tmp_path / "theirs.safetensors", tmp_path / "ours.safetensors"
    subprocess.run([sys.executable, "-c", CHILD, "save", str(theirs)], check=True)
    spec = rq.QuantizerSpec(dim=35, bits=3, seed=7)
    code = rq.Quantizer(spec).quantize(np.random.default_rng(5).standard_normal((3, 4, 35)))
    assert_same_code(rq.load(theirs), code)
    rq.save(ours, code)
    assert ours.read_bytes() == theirs.read_bytes()  # the format is deterministic
    done = subprocess.run([sys.executable, "-c", CHILD, "load", str(ours)], capture_output=True, text=True)
    assert done.stdout.strip() == "same", done.stderr


def _assert_refused(path, data):
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"^{path}: "):
        files.read(path)


def _corruptions(data, step):
    """Every ``step``-th position with its byte inverted, with its lowest bit flipped, and cut there."""
    for i in range(0, len(data), step):
        yield data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        yield data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        yield data[:i]


def test_every_corrupted_byte_of_a_small_file_is_refused(tmp_path):
    code = rq.Quantizer(SPECS["qjl-fp16"]).quantize(_x((2,), 20))
    good = tmp_path / "good.safetensors"
    rq.save(good, {"k": code})
    data = good.read_bytes()
    assert len(data) > 600
    bad = tmp_path / "bad.safetensors"
    for corrupted in _corruptions(data, 1):
        _assert_refused(bad, corrupted)
    _assert_refused(bad, data + b"\0")


def test_every_97th_corrupted_byte_of_a_large_file_is_refused(tmp_path):
    code = rq.Quantizer(rq.QuantizerSpec(dim=128, bits=4, rotation="dense")).quantize(_x((16, 40), 128))
    good = tmp_path / "good.safetensors"
    rq.save(good, code)
    data = good.read_bytes()
    assert len(data) > 40_000
    bad = tmp_path / "bad.safetensors"
    for corrupted in _corruptions(data, 97):
        _assert_refused(bad, corrupted)


def _canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _craft(path, tensors, metadata):
    """A file with a valid SHA-256 (computed as docs/format.md states it) around whatever ``metadata`` says."""
    codes = {np.dtype("uint8"): "U8", np.dtype("float16"): "F16", np.dtype("float32"): "F32"}
    h = hashlib.sha256(_canonical(metadata).encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(_canonical([name, codes[a.dtype], list(a.shape)]).encode())
        h.update(a.tobytes())
    path.write_bytes(safetensors_save(tensors, {"rotorquant": _canonical({**metadata, "sha256": h.hexdigest()})}))


def _parts(path):
    """The tensors and metadata (without the hash) of a file, to edit and `_craft` again."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["rotorquant"])
    del metadata["sha256"]
    dtypes = {"U8": np.uint8, "F16": np.float16, "F32": np.float32}
    tensors = {name: np.frombuffer(t["data"], dtypes[t["dtype"]]).reshape(t["shape"]) for name, t in deserialize(data)}
    return tensors, metadata


def test_the_hash_is_the_documented_one(tmp_path):
    path = tmp_path / "c.safetensors"
    rq.save(path, rq.Quantizer(SPECS["qjl-fp16"]).quantize(_x((3,), 20)))
    tensors, metadata = _parts(path)
    again = tmp_path / "again.safetensors"
    _craft(again, tensors, metadata)
    assert_same_code(rq.load(again), rq.load(path))


def _edit_spec(metadata, **changes):
    entries = json.loads(json.dumps(metadata["entries"]))
    entries[0]["spec"].update(changes)
    return {**metadata, "entries": entries}


def test_files_whose_metadata_does_not_fit_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    rq.save(good, rq.Quantizer(SPECS["rotor"]).quantize(_x((3,), 35)))
    tensors, metadata = _parts(good)
    bad = tmp_path / "bad.safetensors"
    cases = [
        (tensors, {**metadata, "version": 3}, r"format version 3, expected 1 or 2"),
        (tensors, {**metadata, "version": "2"}, r"format version '2', expected 1 or 2"),
        (tensors, _edit_spec(metadata, bits=4), r"payload does not fit its spec: code.codes: expected shape \(3, 18\)"),
        (tensors, _edit_spec(metadata, qjl=True, norm_correction=False), r"missing tensors \['code/qjl_signs'"),
        (tensors, _edit_spec(metadata, norm_dtype="float16"), "code.norms: expected dtype float16, got float32"),
        (tensors, _edit_spec(metadata, bits=9), r"QuantizerSpec.bits: expected an int in 1..8, got 9"),
        (tensors, _edit_spec(metadata, colour="red"), "expected the spec fields"),
        (tensors, _edit_spec(metadata, stages=None), "are not those of the spec they make"),
        ({**tensors, "code/extra": np.zeros(3, np.uint8)}, metadata, r"unexpected \['code/extra'\]"),
        ({**tensors, "code/norms": tensors["code/norms"][:2]}, metadata, r"code.norms: expected shape \(3,\), got \(2,\)"),
        (tensors, {**metadata, "content": "cache"}, "expected a file of codes, got one holding a cache"),
        (tensors, {**metadata, "content": "weights"}, "expected content one of"),
        ({**tensors, "code/codes": tensors["code/codes"] | np.uint8(0x80) * (np.arange(14) == 13)}, metadata,
         "expected the unused high bits of each codes row's last byte to be zero"),
        ({**tensors, "code/norms": -tensors["code/norms"]}, metadata, "expected norms >= 0, got a negative one"),
    ]
    for t, m, message in cases:
        _craft(bad, t, m)
        with pytest.raises(ValueError, match=message):
            rq.load(bad)
    rq.save(good, rq.Quantizer(SPECS["qjl-fp16"]).quantize(_x((3,), 20)))  # 20 signs: 4 unused bits per row
    tensors, metadata = _parts(good)
    signs, residual = tensors["code/qjl_signs"].copy(), tensors["code/residual_norms"].copy()
    signs[1, -1] |= 0x10
    residual[2] = -np.inf
    for t, message in [({**tensors, "code/qjl_signs": signs}, "qjl_signs row's last byte to be zero"),
                       ({**tensors, "code/residual_norms": residual}, "expected residual_norms >= 0")]:  # fmt: skip
        _craft(bad, t, metadata)
        with pytest.raises(ValueError, match=message):
            rq.load(bad)


VERSION_1_FILE = Path(__file__).parent / "data" / "codes_version_1.safetensors"
"""Written by `rotorquant.save` at format version 1 (commit f2742a7): three vectors of dimension 64, each entry
``{packing}{bits}`` their codes at 4 and 3 bits in both packings."""


def test_version_1_files_load_with_their_4_bit_interleaved_codes_in_todays_layout(tmp_path):
    found = rq.load(VERSION_1_FILE)
    stored, _ = _parts(VERSION_1_FILE)
    assert stored["interleaved4/codes"].tobytes() != found["interleaved4"].codes.tobytes()  # converted
    assert stored["interleaved3/codes"].tobytes() == found["interleaved3"].codes.tobytes()  # read as is
    for bits in (4, 3):
        inter, contiguous = found[f"interleaved{bits}"], found[f"contiguous{bits}"]
        want = rq.format.unpack_codes(contiguous.codes, bits, 64)
        np.testing.assert_array_equal(rq.format.unpack_codes(inter.codes, bits, 64, "interleaved"), want)
        np.testing.assert_array_equal(
            rq.Quantizer(inter.spec).dequantize(inter), rq.Quantizer(contiguous.spec).dequantize(contiguous)
        )
    again = tmp_path / "again.safetensors"
    rq.save(again, found)
    assert _parts(again)[1]["version"] == files.VERSION == 2
    for key, code in rq.load(again).items():
        assert_same_code(code, found[key])


def test_files_that_are_not_ours_are_refused(tmp_path):
    code = rq.Quantizer(SPECS["rotor"]).quantize(_x((3,), 35))
    path = tmp_path / "x"
    others = {
        "empty": b"",
        "text": b"hello, this is not a tensor file at all\n",
        "pickle": pickle.dumps(code),
        "huge header": (2**62).to_bytes(8, "little") + b"{}",
        "plain safetensors": safetensors_save({"w": np.ones(3, np.float32)}),
        "other metadata": safetensors_save({"w": np.ones(3, np.float32)}, {"format": "pt"}),
        "other rotorquant": safetensors_save({"w": np.ones(3, np.float32)}, {"rotorquant": "a poem"}),
    }
    torch.save({"codes": torch.ones(3)}, tmp_path / "t.pt")
    others["torch.save"] = (tmp_path / "t.pt").read_bytes()
    for name, data in others.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"^{path}: ") as info:
            rq.load(path)
        assert "not" in str(info.value), (name, info.value)


def test_bad_arguments(tmp_path):
    code = rq.Quantizer(SPECS["rotor"]).quantize(_x((3,), 35))
    path = tmp_path / "c.safetensors"
    with pytest.raises(TypeError, match="codes: expected a rotorquant.Compressed or a dict of them, got list"):
        rq.save(path, [code])
    with pytest.raises(TypeError, match="codes: expected non-empty str keys, got 3"):
        rq.save(path, {3: code})
    with pytest.raises(TypeError, match=r"codes\['k'\]: expected a rotorquant.Compressed, got str"):
        rq.save(path, {"k": "code"})
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int"):
        rq.save(3, code)
    rq.save(path, code)
    before = path.read_bytes()
    broken = [
        (dataclasses.replace(code, norms=code.norms[:2]), ValueError, r"codes.norms: expected shape \(3,\), got \(2,\)"),
        (dataclasses.replace(code, norms=code.norms.astype(np.int32)), TypeError, "codes.norms: expected dtype float32"),
        (dataclasses.replace(code, norms=torch.ones(3, dtype=torch.bfloat16)), TypeError, "got bfloat16"),
        (dataclasses.replace(code, codes=list(code.codes)), TypeError, "codes.codes: expected a numpy.ndarray, got list"),
        (dataclasses.replace(code, dtype="int8"), ValueError, r"codes.dtype: expected one of \('float16'"),
    ]
    for bad, error, message in broken:
        with pytest.raises(error, match=message):
            rq.save(path, bad)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.safetensors"]  # nothing lost, no debris
    with pytest.raises(TypeError, match="like: expected None, a numpy.ndarray or a torch.Tensor, got list"):
        rq.load(path, like=[])
    with pytest.raises(ValueError, match="device: expected None when like is a NumPy array"):
        rq.load(path, like=np.empty(0), device="cpu")
    assert isinstance(rq.load(path, device="cpu").codes, torch.Tensor)
    for device in ("nonsense", 3.5) + (() if torch.cuda.is_available() else ("cuda:0",)):
        with pytest.raises(ValueError, match=rf"device: expected a torch device available here \(such as 'cpu'\), got {device!r}"):
            rq.load(path, device=device)
    with pytest.raises(ValueError, match=r"device: expected a device that holds data, got 'meta'"):
        rq.load(path, device="meta")


def test_a_zero_dimensional_array_keeps_its_shape_on_the_host():
    name, host = files._host(np.array(2.5, dtype=">f4"))
    assert (name, host.shape, host.dtype.str, float(host)) == ("float32", (), "<f4", 2.5)
    name, host = files._host(np.arange(6, dtype=np.int32).reshape(2, 3).T)
    assert host.flags.c_contiguous and host.tolist() == [[0, 3], [1, 4], [2, 5]]


def test_torch_load_with_weights_only_refuses_a_compressed(tmp_path):
    """What the docs say: torch's default ``weights_only=True`` cannot load a pickled `Compressed`."""
    code = rq.Quantizer(SPECS["rotor"], "torch").quantize(torch.ones(2, 35))
    torch.save(code, tmp_path / "c.pt")
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        torch.load(tmp_path / "c.pt")
