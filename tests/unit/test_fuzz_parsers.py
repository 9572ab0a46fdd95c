"""Property-based fuzzing of every parser that takes bytes from outside: desired state and
status messages, keyrings, canonical JSON, bundles (manifest and tar members), and the local
predict API's encodings. Whatever the input, only the project's own refusal comes out (or a
parsed value), within bounded memory. Deterministic (derandomized), so CI reruns the same
examples; the number of examples bounds the time (a few seconds each)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.bundle import verify_bundle
from edge_agent.contracts.canonical import parse_canonical, parse_json
from edge_agent.contracts.errors import BundleError, DesiredStateError, RequestError
from edge_agent.protocol.desired import SignedDesiredState
from edge_agent.protocol.status import ReportedStatus
from edge_agent.protocol.telemetry import TelemetryAck, TelemetryBatch
from edge_agent.serving import codec
from edge_agent.trust import SignedKeyring
from tests.factories import TestFleet, make_bundle

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: Nothing a parser does with a few KiB of input needs more than this.
MEMORY_BOUND = 64 << 20

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


outside_bytes = st.one_of(
    st.binary(max_size=4096),
    json_values.map(_json_bytes),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


@contextmanager
def bounded_memory() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, peak


def _only(refusal: type[Exception] | tuple[type[Exception], ...], parse: Callable[[], Any]) -> None:
    with bounded_memory(), suppress(refusal):
        parse()


@FUZZ
@given(outside_bytes)
def test_desired_state(payload: bytes) -> None:
    _only(DesiredStateError, lambda: SignedDesiredState.from_bytes(payload))


@FUZZ
@given(outside_bytes)
def test_status(payload: bytes) -> None:
    _only(ValueError, lambda: ReportedStatus.from_bytes(payload))


@FUZZ
@given(outside_bytes)
def test_telemetry_batch(payload: bytes) -> None:
    _only(ValueError, lambda: TelemetryBatch.from_bytes(payload))


@FUZZ
@given(outside_bytes)
def test_telemetry_ack(payload: bytes) -> None:
    _only(ValueError, lambda: TelemetryAck.from_bytes(payload))


@FUZZ
@given(outside_bytes)
def test_keyring(payload: bytes) -> None:
    _only(BundleError, lambda: SignedKeyring.from_bytes(payload))


@FUZZ
@given(outside_bytes)
def test_canonical_json(payload: bytes) -> None:
    _only(ValueError, lambda: parse_canonical(payload))
    _only(ValueError, lambda: parse_json(payload))


@FUZZ
@given(outside_bytes)
def test_predict_json_body(payload: bytes) -> None:
    _only(RequestError, lambda: codec.decode_json_body(payload))


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["b64", "dtype", "shape", "x"]),
        st.one_of(
            st.text(max_size=12),
            st.lists(st.integers(-(2**40), 2**40), max_size=4),
            st.sampled_from(["float32", "int8", "V8", "O", "S3", "float32,int8", "<f4", ">i2"]),
        ),
        max_size=4,
    )
)
def test_predict_json_b64_value(value: dict[str, Any]) -> None:
    _only(RequestError, lambda: codec.decode_json_value("x", value))


@FUZZ
@given(
    st.binary(max_size=256),
    st.one_of(st.none(), st.text(max_size=16), st.sampled_from(["float32", "int64", "V4", "O"])),
    st.one_of(
        st.none(),
        st.text(max_size=16),
        st.lists(st.integers(-4, 2**33), max_size=4).map(lambda d: ",".join(map(str, d))),
    ),
)
def test_predict_raw_tensor(body: bytes, dtype: str | None, shape: str | None) -> None:
    _only(RequestError, lambda: codec.decode_tensor(body, dtype, shape, what="input"))


def _npy_like(data: st.DataObject) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.arange(data.draw(st.integers(0, 64)), dtype=np.float32))
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    return bytes(raw[: data.draw(st.integers(0, len(raw)))])


@FUZZ
@given(st.data())
def test_predict_npy(data: st.DataObject) -> None:
    body = _npy_like(data)
    _only(RequestError, lambda: codec.decode_npy(body))


@FUZZ
@given(st.data())
def test_predict_npz(data: st.DataObject) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros(data.draw(st.integers(0, 256)), np.float32))
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    body = bytes(raw[: data.draw(st.integers(0, len(raw)))])
    _only(RequestError, lambda: codec.decode_npz(body))


@pytest.fixture(scope="module")
def real_bundle(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[bytes, TestFleet]:
    fleet = TestFleet()
    out = tmp_path_factory.mktemp("fuzz") / "b.efb"
    make_bundle(model_path, out, fleet=fleet)
    return out.read_bytes(), fleet


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_bundles(
    data: st.DataObject,
    real_bundle: tuple[bytes, TestFleet],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A real signed bundle with bytes flipped, cut short, or spliced: the manifest, the
    signature, tar headers and member data all get hit."""
    original, fleet = real_bundle
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    work = tmp_path_factory.mktemp("b")
    path = work / "x.efb"
    path.write_bytes(bytes(raw))
    trust = fleet.trust_store(work / "keyring.json")
    stage = work / "stage"
    with bounded_memory():
        try:
            verify_bundle(
                path, stage, profile="x86-64-avx2", runtimes={"onnxruntime": "1.20.0"}, trust=trust
            )
        except BundleError:
            assert not stage.exists()


@pytest.mark.parametrize("dtype", [",", "f4,", "(2,", "i8,,"])
def test_a_dtype_numpy_cannot_parse_is_a_request_error(dtype: str) -> None:
    # Found by the fuzzer above: numpy parses "a,b" dtypes with ast.literal_eval.
    with pytest.raises(RequestError):  # not a SyntaxError from inside numpy
        codec.decode_json_value("x", {"dtype": dtype, "shape": [1], "b64": ""})


@FUZZ
@given(st.data())
def test_score_npy_files_with_a_header_seen_before(data: st.DataObject) -> None:
    """``codec.decode_npy`` keeps .npy headers numpy has parsed: a body whose header matches
    a kept one but whose data does not fit it (cut, flipped) is refused like any other."""
    import io

    import numpy as np

    for n in range(65):  # every header _npy_like can start from is a known one
        buf = io.BytesIO()
        np.save(buf, np.arange(n, dtype=np.float32))
        codec.decode_npy(buf.getvalue())
    body = _npy_like(data)
    _only(RequestError, lambda: codec.decode_npy(body))


@FUZZ
@given(outside_bytes)
def test_stream_message(payload: bytes) -> None:
    from edge_agent.serving.stream import _document, _feeds, _message_id

    def parse() -> None:
        doc = _document(payload)
        _message_id(doc)
        _feeds(doc)

    _only(RequestError, parse)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_score_image_files(data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A real PNG or JPEG with bytes flipped or cut short: decoded or refused by name."""
    import io

    import numpy as np
    from PIL import Image

    from edge_agent import scoring

    pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    buf = io.BytesIO()
    kind = data.draw(st.sampled_from(["PNG", "JPEG", "BMP"]))
    Image.fromarray(pixels).save(buf, format=kind)
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("img") / f"x.{kind.lower()}"
    path.write_bytes(bytes(raw))
    pre = {"input": "x", "size": [8, 8], "layout": "NCHW", "channels": "RGB", "scale": 1 / 255}
    with bounded_memory(), suppress(RequestError):
        assert scoring.load_image(path, pre, "float32").shape == (1, 3, 8, 8)


def test_an_image_too_large_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    from PIL import Image

    from edge_agent import scoring

    path = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(path)  # 81 megapixels in a file of a few KiB
    pre = {"input": "x", "size": [8, 8]}
    with bounded_memory(), pytest.raises(RequestError) as refused:
        scoring.load_image(path, pre, "float32")
    assert refused.value.reason == "image_too_large"
