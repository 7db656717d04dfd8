"""`save` and `load`: compressed codes in a file, in the safetensors format, with a format version and a SHA-256.

    >>> import os, tempfile, numpy as np, rotorquant as rq
    >>> code = rq.Quantizer(rq.QuantizerSpec(dim=64, bits=3)).quantize(np.ones((2, 64)))
    >>> path = os.path.join(tempfile.mkdtemp(), "code.safetensors")
    >>> rq.save(path, code)
    >>> back = rq.load(path)
    >>> back.spec == code.spec and bool((back.codes == code.codes).all())
    True

A file is a safetensors file (8-byte little-endian header length, JSON header, raw little-endian tensor bytes).
Every payload field of a code is one tensor named ``{key}/{field}`` (``key`` is ``"code"`` for a single
`Compressed`, the dict key otherwise); a calibrated code adds ``{key}/calibration.scale`` and, when centered,
``{key}/calibration.center``. The header's ``__metadata__`` has one entry, ``"rotorquant"``, a JSON object
(keys sorted, no spaces) with:

=============  =================================================================================
``version``    ``2`` (`VERSION`); `load` also reads version 1 (see below)
``content``    ``"code"`` (one `Compressed`), ``"codes"`` (a dict of them) or ``"cache"``
               (`rotorquant.integrations.transformers.RotorQuantCache.save`)
``entries``    ``[{"key": ..., "spec": {every QuantizerSpec field}, "dtype": ..., "calibration": null or
               {"center": bool}}, ...]`` in the order of the dict given to `save`
``arrays``     the names of the plain tensors (a cache's full-precision windows)
``info``       whatever else the content needs (a cache's options and lengths)
``sha256``     hex SHA-256 of: the JSON of this object without ``sha256`` (keys sorted, separators ``,``
               and ``:``), then, for every tensor in name order, the JSON ``[name, dtype, shape]`` (the
               safetensors dtype, e.g. ``"U8"``) followed by the tensor's bytes
=============  =================================================================================

Equal contents give byte-identical files.

`load` reads the whole file, checks the version, the SHA-256 and that every payload field has the dtype and
shape its spec gives, and raises ``ValueError`` naming the file and the problem otherwise. The parameters are
not stored: they are rebuilt with `rotorquant.build_params` from the spec.

Version 1 differs in one thing: codes in the interleaved packing at 4 bits had another layout (words 0..2 of a
chunk as at 3 bits on the magnitude indices, word 3 with the top bit of coordinate ``32c + 4s + j`` at bit
``8j + s``). `load` converts them to the current layout (`_codes_from_version_1`); everything else reads as is.

Pickling a `Compressed` works, but ``torch.save`` then ``torch.load`` (``weights_only=True``, torch's default)
refuses it (``Unsupported global``), and a pickle carries no version or checksum: `save` and `load` are the
documented way to store codes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np
from safetensors import SafetensorError, TensorSpec, deserialize, serialize

from .arrays import NUMPY
from .calibration import Calibration
from .checks import check_code
from .format import CODE_DTYPES, PACKED_FIELDS, PAYLOAD_FIELDS, Compressed, pack_codes, unpack_codes
from .params import build_params
from .spec import Packing, QuantizerSpec

KEY = "rotorquant"
"""The one ``__metadata__`` entry of a file."""

VERSION = 2
"""The format version this module writes (it reads this one and version 1)."""

CONTENTS = ("code", "codes", "cache")
"""What a file holds: one `Compressed`, a dict of them, or a transformers cache."""

METADATA_KEYS = ("arrays", "content", "entries", "info", "sha256", "version")

SAFETENSORS_DTYPES = {"uint8": "U8", "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
"""Tensor dtypes a file may hold, by name, with their safetensors names."""

SINGLE = "code"
"""The key of the one code of a ``"code"`` file."""


@dataclasses.dataclass(frozen=True)
class Contents:
    """What `read` found in a file: ``entries`` (key -> `Compressed`), ``arrays`` (name -> array) and ``info``."""

    content: str
    entries: dict[str, Compressed]
    arrays: dict[str, Any]
    info: dict


def save(path: str | os.PathLike, codes: Compressed | dict[str, Compressed]) -> None:
    """Write ``codes`` (one `Compressed` or a ``dict[str, Compressed]``, NumPy or torch, any device) to ``path``.

    The file is written next to ``path`` and then renamed onto it, so an existing file is replaced only by a
    complete one. A calibrated code is saved with its calibration's statistics (not with custom parameters:
    a calibration must be fitted on ``build_params(spec)``).
    """
    if isinstance(codes, Compressed):
        write(path, {SINGLE: codes}, content="code")
        return
    if not isinstance(codes, dict):
        raise TypeError(f"codes: expected a rotorquant.Compressed or a dict of them, got {type(codes).__name__}")
    for key in codes:
        if not isinstance(key, str) or not key:
            raise TypeError(f"codes: expected non-empty str keys, got {key!r}")
    write(path, codes, content="codes")


def load(path: str | os.PathLike, *, like=None, device=None) -> Compressed | dict[str, Compressed]:
    """Read what `save` wrote: the same structure, with byte-identical payloads.

    Args:
        path: the file.
        like: None or a NumPy array: NumPy arrays; a torch tensor: torch tensors on its device.
        device: a torch device for the tensors (with ``like=None`` it implies torch tensors).

    Raises ``ValueError`` naming the file and the problem for a truncated, damaged or foreign file, another
    format version, or a payload its spec cannot have (see ``docs/format.md``).
    """
    found = read(path, like=like, device=device)
    if found.content not in ("code", "codes"):
        raise ValueError(
            f"{os.fspath(path)}: expected a file of codes, got one holding a {found.content} "
            "(a RotorQuantCache file: read it with RotorQuantCache.load)"
        )
    return found.entries[SINGLE] if found.content == "code" else found.entries


def write(
    path: str | os.PathLike,
    entries: dict[str, Compressed],
    *,
    content: str,
    arrays: dict[str, Any] | None = None,
    info: dict | None = None,
) -> None:
    """Write ``entries`` (checked codes), plain ``arrays`` (NumPy or torch) and JSON ``info`` as one file."""
    path = _path(path)
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    described = []
    for key, code in entries.items():
        where = "codes" if content == "code" else f"codes[{key!r}]"
        fields, cal = _checked_payload(where, code)
        for field, a in fields.items():
            tensors[f"{key}/{field}"] = (a.dtype.name, a)
        if cal is not None:
            tensors[f"{key}/calibration.scale"] = _host(cal.scale)
            if cal.center is not None:
                tensors[f"{key}/calibration.center"] = _host(cal.center)
        described.append({
            "key": key,
            "spec": spec_fields(code.spec),
            "dtype": code.dtype,
            "calibration": None if cal is None else {"center": cal.center is not None},
        })
    arrays = arrays or {}
    for name, a in arrays.items():
        if name in tensors:
            raise ValueError(f"arrays: the name {name!r} is taken by a code's field")
        tensors[name] = _host(a)
        if tensors[name][0] not in SAFETENSORS_DTYPES:
            dtypes = sorted(SAFETENSORS_DTYPES)
            raise TypeError(f"arrays[{name!r}]: expected a dtype among {dtypes}, got {tensors[name][0]}")
    metadata = {
        "version": VERSION, "content": content, "entries": described, "arrays": sorted(arrays), "info": info or {}
    }
    metadata["sha256"] = _digest(
        metadata, {name: (SAFETENSORS_DTYPES[dt], a.shape, a) for name, (dt, a) in tensors.items()}
    )
    specs = {
        name: TensorSpec(dtype=dt, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, (dt, a) in tensors.items()
    }
    data = bytes(serialize(specs, metadata={KEY: _json(metadata)}))  # ``tensors`` keeps every buffer alive meanwhile
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read(path: str | os.PathLike, *, like=None, device=None) -> Contents:
    """Read and check a file written by `write`; arrays as ``like`` and ``device`` pick (see `load`)."""
    path = _path(path)
    convert = _converter(like, device)
    with open(path, "rb") as f:
        data = f.read()

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: {problem}")

    metadata = _metadata(data, fail)
    try:
        raw = deserialize(data)
    except SafetensorError as exc:
        raise fail(f"not a valid safetensors file ({exc})") from None
    tensors = {name: (t["dtype"], tuple(t["shape"]), t["data"]) for name, t in raw}
    if len(tensors) != len(raw):
        raise fail("not a valid safetensors file (a tensor name appears twice)")
    if _digest(metadata, tensors) != metadata["sha256"]:
        raise fail("the SHA-256 of the metadata and the tensors does not match the stored one (the file is corrupt)")
    content, described, array_names, info = (metadata[k] for k in ("content", "entries", "arrays", "info"))
    if content not in CONTENTS:
        raise fail(f"expected content one of {CONTENTS}, got {content!r}")
    if not isinstance(described, list) or not isinstance(info, dict):
        raise fail("metadata: expected entries to be a JSON list and info an object")
    if not isinstance(array_names, list) or not all(isinstance(n, str) for n in array_names):
        raise fail("metadata: expected arrays to be a list of names")
    expected_names = set(array_names)
    entries = {}
    for entry in described:
        key = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(key, str) or key in entries:
            raise fail(f"metadata: expected entries with distinct str keys, got {entry!r}")
        entries[key], names = _entry(key, entry, tensors, metadata["version"], convert, fail)
        expected_names |= names
    if content == "code" and list(entries) != [SINGLE]:
        raise fail(f"expected one entry {SINGLE!r} in a 'code' file, got {list(entries)}")
    if set(tensors) != expected_names:
        extra, missing = sorted(set(tensors) - expected_names), sorted(expected_names - set(tensors))
        raise fail(f"tensors do not match the metadata: unexpected {extra}, missing {missing}")
    arrays = {name: convert(*tensors[name], fail, name) for name in array_names}
    return Contents(content, entries, arrays, info)


def spec_fields(spec: QuantizerSpec) -> dict[str, Any]:
    """Every field of ``spec`` as JSON values (enums as their strings)."""
    return {
        f.name: (v.value if isinstance(v, enum.Enum) else v)
        for f in dataclasses.fields(QuantizerSpec)
        for v in (getattr(spec, f.name),)
    }


def _path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(metadata: dict, tensors: dict[str, tuple[str, tuple, Any]]) -> str:
    """The SHA-256 documented in the module docstring (``tensors``: name -> (safetensors dtype, shape, bytes))."""
    h = hashlib.sha256(_json({k: v for k, v in metadata.items() if k != "sha256"}).encode())
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        h.update(_json([name, dtype, list(shape)]).encode())
        h.update(data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data)
    return h.hexdigest()


def _metadata(data: bytes, fail) -> dict:
    """rotorquant's object in the ``__metadata__`` of a safetensors header, checked to be of this version."""
    if len(data) < 8:
        raise fail(f"not a safetensors file: {len(data)} bytes, fewer than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise fail(f"truncated, or not a safetensors file: a header of {n} bytes does not fit in {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise fail("not a safetensors file: its header is not JSON") from None
    outer = header.get("__metadata__") if isinstance(header, dict) else None
    text = outer.get(KEY) if isinstance(outer, dict) else None
    if not isinstance(text, str):
        raise fail(f"a file not written by rotorquant.save (no {KEY!r} entry in its metadata)")
    try:
        metadata = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise fail(f"the {KEY!r} metadata is not JSON") from None
    if not isinstance(metadata, dict) or "version" not in metadata:
        raise fail(f"the {KEY!r} metadata has no format version")
    if type(metadata["version"]) is not int or metadata["version"] not in (1, VERSION):
        raise fail(f"format version {metadata['version']!r}, expected 1 or {VERSION} (another rotorquant wrote it)")
    if sorted(metadata) != sorted(METADATA_KEYS) or not isinstance(metadata["sha256"], str):
        raise fail(f"expected metadata keys {sorted(METADATA_KEYS)}, got {sorted(metadata)}")
    if _json(metadata) != text:
        raise fail(f"the {KEY!r} metadata is not in its canonical form (keys sorted, no spaces)")
    return metadata


def _host(a) -> tuple[str, np.ndarray]:
    """``a`` (NumPy or torch, any device) as ``(dtype name, C-contiguous little-endian host array)``; bfloat16 is
    carried as its raw 16-bit words."""
    if isinstance(a, np.ndarray):
        host, name = a, a.dtype.name
    elif type(a).__module__.split(".")[0] == "torch":
        import torch

        t = a.detach().to("cpu").contiguous()
        name = str(t.dtype).removeprefix("torch.")
        host = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    else:
        raise TypeError(f"expected a numpy.ndarray or torch.Tensor, got {type(a).__name__}")
    return name, np.asarray(host, dtype=host.dtype.newbyteorder("<"), order="C")


def _checked_payload(where: str, code: object) -> tuple[dict[str, np.ndarray], Calibration | None]:
    """The payload fields of ``code`` as host arrays (checked against its spec, as the tiers check them) and its
    calibration."""
    if not isinstance(code, Compressed):
        raise TypeError(f"{where}: expected a rotorquant.Compressed, got {type(code).__name__}")
    if code.dtype not in CODE_DTYPES:
        raise ValueError(f"{where}.dtype: expected one of {CODE_DTYPES}, got {code.dtype!r}")
    hosted = {}
    for f in PAYLOAD_FIELDS:
        a = getattr(code, f)
        if a is None or not _is_array(a):
            continue  # check_code names what is missing or of the wrong type
        name, host = _host(a)
        if name == "bfloat16":  # carried as int16 words: name the real dtype
            expected = "uint8" if f in PACKED_FIELDS else code.spec.norm_dtype.value
            raise TypeError(f"{where}.{f}: expected dtype {expected}, got bfloat16")
        hosted[f] = host
    check_code(where, dataclasses.replace(code, calibration=None, **hosted), build_params(code.spec), NUMPY)
    cal = code.calibration
    if cal is not None:
        if not isinstance(cal, Calibration):
            raise TypeError(f"{where}.calibration: expected a rotorquant.Calibration, got {type(cal).__name__}")
        if not cal.params.same_as(build_params(code.spec)):
            raise ValueError(
                f"{where}.calibration: expected one fitted on build_params(spec), got one on other parameters "
                "(a file stores the spec, not the parameters)"
            )
    return hosted, cal


def _is_array(a) -> bool:
    return isinstance(a, np.ndarray) or type(a).__module__.split(".")[0] == "torch"


def _entry(key: str, entry, tensors: dict, version: int, convert, fail) -> tuple[Compressed, set[str]]:
    """The `Compressed` of metadata entry ``key`` (of a file of format ``version``) and the names of its tensors,
    everything checked."""
    where = f"entry {key!r}"
    if sorted(entry) != ["calibration", "dtype", "key", "spec"]:
        raise fail(f"{where}: expected keys ['calibration', 'dtype', 'key', 'spec'], got {sorted(entry)}")
    fields = entry["spec"]
    names = [f.name for f in dataclasses.fields(QuantizerSpec)]
    if not isinstance(fields, dict) or sorted(fields) != sorted(names):
        raise fail(f"{where}: expected the spec fields {names}, got {fields!r}")
    try:
        spec = QuantizerSpec(**fields)
    except (TypeError, ValueError) as exc:
        raise fail(f"{where}: {exc}") from None
    if spec_fields(spec) != fields:
        raise fail(f"{where}: spec fields {fields} are not those of the spec they make, {spec_fields(spec)}")
    if entry["dtype"] not in CODE_DTYPES:
        raise fail(f"{where}: expected dtype one of {CODE_DTYPES}, got {entry['dtype']!r}")
    cal_info = entry["calibration"]
    if cal_info is not None and (not isinstance(cal_info, dict) or list(cal_info) != ["center"]):
        raise fail(f"{where}: expected calibration null or {{'center': bool}}, got {cal_info!r}")
    wanted = [f for f in PAYLOAD_FIELDS if spec.qjl or f in ("codes", "norms")]
    cal_names = [] if cal_info is None else ["scale"] + (["center"] if cal_info["center"] else [])
    used = {f"{key}/{f}" for f in wanted} | {f"{key}/calibration.{c}" for c in cal_names}
    missing = sorted(used - set(tensors))
    if missing:
        raise fail(f"{where}: missing tensors {missing}")
    if version == 1 and spec.packing is Packing.INTERLEAVED and spec.mse_bits == 4:
        dtype, shape, data = tensors[f"{key}/codes"]
        if dtype == "U8" and shape[-1:] == (spec.code_bytes,):  # else check_code below names the problem
            codes = _codes_from_version_1(_numpy(dtype, shape, data, fail, f"{key}/codes"), spec.dim)
            tensors[f"{key}/codes"] = (dtype, shape, codes.tobytes())
    host = {f: _numpy(*tensors[f"{key}/{f}"], fail, f"{key}/{f}") for f in wanted}
    code = Compressed(spec=spec, dtype=entry["dtype"], **host)
    try:
        check_code("code", code, build_params(spec), NUMPY)
    except (TypeError, ValueError) as exc:
        raise fail(f"{where}: the payload does not fit its spec: {exc}") from None
    _check_stream_form(where, host, spec, fail)
    calibration = None
    if cal_info is not None:
        stats = [_numpy(*tensors[f"{key}/calibration.{c}"], fail, f"{key}/calibration.{c}") for c in cal_names]
        try:
            calibration = Calibration(build_params(spec), *stats)
        except (TypeError, ValueError) as exc:
            raise fail(f"{where}: calibration: {exc}") from None
    arrays = {f: convert(*tensors[f"{key}/{f}"], fail, f"{key}/{f}") for f in wanted}
    return dataclasses.replace(code, calibration=calibration, **arrays), used


def _codes_from_version_1(packed: np.ndarray, dim: int) -> np.ndarray:
    """``(..., dim / 2)`` uint8 rows of 4-bit interleaved codes in format version 1's layout, in the current one: there
    words 0..2 of each chunk hold the magnitude indices ``m`` as the 3-bit interleaved layout does, and word 3 holds
    the top bit of coordinate ``32c + 4s + j`` at bit ``8j + s``; the code is ``8 + m`` (top bit 1) or ``7 - m``."""
    chunks = dim // 32
    m = unpack_codes(packed[..., : 12 * chunks], 3, dim, Packing.INTERLEAVED).astype(np.int64)
    tops = np.ascontiguousarray(packed[..., 12 * chunks :]).view("<u4").astype(np.int64)  # (..., C)
    place = 8 * np.arange(4) + np.arange(8)[:, None]  # [s, j]: 8j + s
    top = ((tops[..., None, None] >> place) & 1).reshape(m.shape)
    return pack_codes(np.where(top == 1, 8 + m, 7 - m), 4, Packing.INTERLEAVED)


def _check_stream_form(where: str, host: dict[str, np.ndarray], spec: QuantizerSpec, fail) -> None:
    """What `quantize` writes and nothing else: the unused high bits of each packed row's last byte are zero
    (``docs/format.md``), and no norm is negative (NaN and +Inf, which unchecked calls store, pass)."""
    streams = {"codes": spec.dim * spec.mse_bits}
    if spec.qjl:
        streams["qjl_signs"] = spec.qjl_dim
    for field, bits in streams.items():
        rows = host[field]
        if bits % 8 and rows.size and (rows[..., -1] >> (bits % 8)).any():
            raise fail(f"{where}: expected the unused high bits of each {field} row's last byte to be zero")
    for field in ("norms", "residual_norms") if spec.qjl else ("norms",):
        if (host[field] < 0).any():
            raise fail(f"{where}: expected {field} >= 0, got a negative one")


_NUMPY_DTYPES = {"U8": "<u1", "F16": "<f2", "F32": "<f4", "F64": "<f8"}


def _numpy(dtype: str, shape: tuple, data, fail, name: str) -> np.ndarray:
    """A safetensors tensor as a NumPy array (not bfloat16)."""
    if dtype not in _NUMPY_DTYPES:
        raise fail(f"tensor {name!r}: expected a dtype among {sorted(_NUMPY_DTYPES)}, got {dtype}")
    return np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype]).reshape(shape).astype(_NUMPY_DTYPES[dtype][1:])


def _converter(like, device):
    """A function ``(dtype, shape, bytes, fail, name) -> array`` giving the array type ``like`` and ``device`` ask."""
    if isinstance(like, np.ndarray) or (like is None and device is None):
        if device is not None:
            raise ValueError(f"device: expected None when like is a NumPy array (NumPy is on the host), got {device!r}")
        return _numpy_or_fail
    if like is not None and type(like).__module__.split(".")[0] != "torch":
        raise TypeError(f"like: expected None, a numpy.ndarray or a torch.Tensor, got {type(like).__name__}")
    import torch

    if like is not None and not isinstance(like, torch.Tensor):
        raise TypeError(f"like: expected None, a numpy.ndarray or a torch.Tensor, got {type(like).__name__}")
    target = _torch_device(device) if device is not None else like.device

    def to_torch(dtype, shape, data, fail, name):
        if dtype == "BF16":
            words = np.frombuffer(data, dtype="<i2").astype(np.int16).reshape(shape)
            return torch.from_numpy(words).view(torch.bfloat16).to(target)
        return torch.from_numpy(_numpy(dtype, shape, data, fail, name)).to(target)

    return to_torch


def _torch_device(device):
    """``device`` as a `torch.device` that can hold tensors here, or a `ValueError` naming it."""
    import torch

    try:
        target = torch.device(device)
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError, TypeError) as error:
        raise ValueError(f"device: expected a torch device available here (such as 'cpu'), got {device!r}: {error}") from None
    if target.type == "meta":
        raise ValueError(f"device: expected a device that holds data, got {device!r} (meta tensors hold none)")
    return target


def _numpy_or_fail(dtype, shape, data, fail, name):
    if dtype == "BF16":
        raise fail(f"tensor {name!r} is bfloat16, which NumPy has no dtype for: load it as torch tensors (like=)")
    return _numpy(dtype, shape, data, fail, name)


__all__ = ["save", "load", "VERSION"]
