"""Array encodings of the local inference API, shared by the server side and the client.

- ``application/json``: ``{"inputs": {name: value}}`` where a value is a nested list, or
  ``{"b64": base64 of the raw little-endian bytes, "dtype": "float32", "shape": [1, 3]}``.
- ``application/x-npz``: a numpy ``.npz`` archive, one array per input (or output) name.
- ``application/x-npy``: one ``.npy`` array, for models with a single input.
- ``application/x-edgefleet-tensor``: one tensor's raw little-endian C-order bytes, its
  dtype and shape in the ``X-Edgefleet-Dtype`` (``float32``) and ``X-Edgefleet-Shape``
  (``1,3,224,224``) headers. Nothing to parse but two headers, and the body is used in place:
  the fastest encoding, and the one the Python client uses for single tensors.
"""

from __future__ import annotations

import base64
import io
import json
import math
import zipfile
from typing import Any

import numpy as np

from edge_agent.contracts.errors import RequestError
from edge_agent.contracts.npy import NPY_LOCK

JSON = "application/json"
NPZ = "application/x-npz"
NPY = "application/x-npy"
TENSOR = "application/x-edgefleet-tensor"
DTYPE_HEADER = "X-Edgefleet-Dtype"
SHAPE_HEADER = "X-Edgefleet-Shape"


def decode_json_value(name: str, value: Any) -> np.ndarray:
    if isinstance(value, dict):
        try:
            dtype = np.dtype(value["dtype"])
            shape = [int(d) for d in value["shape"]]
            raw = base64.b64decode(value["b64"], validate=True)
        except (KeyError, TypeError, ValueError, SyntaxError) as e:
            # numpy reads "a,b" dtypes with ast.literal_eval: a stray comma is a SyntaxError.
            raise RequestError(
                f"input {name!r}: a base64 array needs 'b64', 'dtype' and 'shape' ({e})",
                reason="input_encoding",
            ) from e
        if dtype.kind not in "biuf":
            raise RequestError(f"input {name!r}: dtype {dtype} is not allowed")
        if any(d < 0 for d in shape):
            raise RequestError(
                f"input {name!r}: negative dimension in shape {shape}", reason="input_encoding"
            )
        expected = math.prod(shape) * dtype.itemsize
        if len(raw) != expected:
            raise RequestError(
                f"input {name!r}: {len(raw)} bytes do not fill shape {shape} of {dtype}",
                reason="input_encoding",
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
    try:
        arr = np.asarray(value)
    except (ValueError, RecursionError, OverflowError) as e:
        raise RequestError(
            f"input {name!r}: ragged nested list ({e})", reason="input_encoding"
        ) from e
    if arr.dtype.kind not in "biuf":
        raise RequestError(f"input {name!r}: not an array of numbers", reason="input_encoding")
    return arr


def decode_json_body(body: bytes | bytearray) -> tuple[dict[str, np.ndarray], str]:
    """``{"inputs": {name: value}, "output_encoding": "list"|"b64"}`` → (feeds, encoding)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"body is not valid JSON: {e}", reason="input_encoding") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise RequestError('JSON body must be {"inputs": {name: array}}', reason="input_encoding")
    encoding = doc.get("output_encoding", "list")
    if encoding not in ("list", "b64"):
        raise RequestError("output_encoding must be 'list' or 'b64'", reason="input_encoding")
    return {k: decode_json_value(k, v) for k, v in doc["inputs"].items()}, encoding


def encode_json_value(arr: np.ndarray, encoding: str) -> Any:
    if encoding == "b64":
        le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        return {
            "b64": base64.b64encode(le.tobytes()).decode(),
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
        }
    return arr.tolist()


#: An .npz body may not unpack to more than this (a zip of zeros compresses 1000:1).
MAX_NPZ_UNPACKED_BYTES = 1 << 30


def decode_npz(body: bytes | bytearray) -> dict[str, np.ndarray]:
    """Whatever the bytes hold, the only error is a ``RequestError`` naming the problem."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > MAX_NPZ_UNPACKED_BYTES:
            raise RequestError(
                f".npz body unpacks to {unpacked} bytes (limit {MAX_NPZ_UNPACKED_BYTES})",
                reason="input_encoding",
            )
        with NPY_LOCK, np.load(io.BytesIO(body), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except RequestError:
        raise
    except Exception as e:  # numpy and zipfile raise a dozen types for bad bytes
        raise RequestError(f"body is not a valid .npz archive: {e}", reason="input_encoding") from e


def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """What ``np.savez`` writes, for any names: ``np.savez(buf, **arrays)`` fails on an array
    named ``file`` (its own first parameter)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, arr in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


#: .npy headers numpy has accepted (magic, version, length and the header dict, as bytes) →
#: (dtype, shape) of the C-ordered array they describe. Bodies and files of one shape share a
#: header, and numpy parses each one with ``ast.literal_eval`` (~100 µs, most of reading a
#: small array); a header seen before is matched byte for byte instead.
_NPY_HEADERS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...]]] = {}
_MAX_NPY_HEADERS = 64


def decode_npy(body: bytes) -> np.ndarray:
    """Whatever the bytes hold, the only error is a ``RequestError`` naming the problem."""
    end = 0
    if body[:6] == b"\x93NUMPY" and len(body) >= 10:
        size = 2 if body[6] == 1 else 4
        end = 8 + size + int.from_bytes(body[8 : 8 + size], "little")
        known = _NPY_HEADERS.get(body[:end])
        if known is not None:
            dtype, shape = known
            if len(body) - end != dtype.itemsize * math.prod(shape):
                raise RequestError(
                    f"body is not a valid .npy array: {len(body) - end} data bytes do not fill "
                    f"shape {list(shape)} of {dtype}",
                    reason="input_encoding",
                )
            return np.frombuffer(body, dtype, offset=end).reshape(shape)
    try:
        with NPY_LOCK:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises several types for bad bytes
        raise RequestError(f"body is not a valid .npy array: {e}", reason="input_encoding") from e
    if not isinstance(arr, np.ndarray):
        raise RequestError("body is not a single .npy array", reason="input_encoding")
    kept = end and arr.flags.c_contiguous and arr.dtype.kind in "biuf"
    if kept and len(_NPY_HEADERS) < _MAX_NPY_HEADERS:
        _NPY_HEADERS[bytes(body[:end])] = (arr.dtype, arr.shape)
    return arr


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


#: X-Edgefleet-Dtype values seen → their little-endian dtype (only valid, allowed ones: a
#: small set, as numpy knows only so many names).
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {}


def decode_tensor(
    body: bytes | bytearray, dtype: str | None, shape: str | None, *, what: str
) -> np.ndarray:
    """A raw tensor body and its two headers → an array over ``body`` (no copy; read-only
    when ``body`` is bytes)."""
    if not dtype or shape is None:
        raise RequestError(
            f"{what}: a {TENSOR} body needs the {DTYPE_HEADER} and {SHAPE_HEADER} headers",
            reason="input_encoding",
        )
    dt = _WIRE_DTYPES.get(dtype)
    try:
        if dt is None:
            dt = np.dtype(dtype)
        dims = [int(d) for d in shape.split(",")] if shape.strip() else []
    except (TypeError, ValueError, SyntaxError) as e:
        raise RequestError(
            f"{what}: bad {DTYPE_HEADER} {dtype!r} or {SHAPE_HEADER} {shape!r} ({e})",
            reason="input_encoding",
        ) from e
    if dtype not in _WIRE_DTYPES:  # checked and cached once per header value
        if dt.kind not in "biuf":
            raise RequestError(f"{what}: dtype {dt} is not allowed", reason="input_encoding")
        dt = _WIRE_DTYPES[dtype] = dt.newbyteorder("<")  # the bytes are little-endian
    if any(d < 0 for d in dims):
        raise RequestError(f"{what}: negative dimension in shape {dims}", reason="input_encoding")
    expected = math.prod(dims) * dt.itemsize
    if len(body) != expected:
        raise RequestError(
            f"{what}: {len(body)} bytes do not fill shape {dims} of {dt} ({expected} bytes)",
            reason="input_encoding",
        )
    return np.frombuffer(body, dtype=dt).reshape(dims)


_NAMES: dict[np.dtype[Any], str] = {}


def dtype_name(dt: np.dtype[Any]) -> str:
    """``dt.name``, which numpy computes in Python each time (µs on the hot path)."""
    name = _NAMES.get(dt)
    if name is None:
        name = _NAMES[dt] = dt.name
    return name


def tensor_bytes(arr: np.ndarray) -> memoryview:
    """An array's raw little-endian C-order bytes: a view of it when it already is (no copy)."""
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return le.reshape(-1).view(np.uint8).data


def encode_tensor(arr: np.ndarray) -> tuple[memoryview, dict[str, str]]:
    """An array → its raw little-endian bytes and the dtype/shape headers."""
    headers = {DTYPE_HEADER: dtype_name(arr.dtype), SHAPE_HEADER: ",".join(map(str, arr.shape))}
    return tensor_bytes(arr), headers
