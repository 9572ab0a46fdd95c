"""The local inference API over real HTTP, with the shipped FakeModel (the real runtime
interface), and the reference-counted swap."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle import (
    TensorSpec,
)
from edge_agent.contracts.errors import RequestError
from edge_agent.protocol.status import VersionRef
from edge_agent.runtimes import LoadedModel, check_feeds
from edge_agent.runtimes.fake import FakeModel
from edge_agent.serving import InferenceHTTPServer, ServingModel, SlotTable, codec, start_http
from edge_agent.serving.client import AgentClient, AgentError
from edge_agent.serving.stats import CHECK_BATCH, CHECK_BATCH_BYTES, ModelStats
from tests.factories import served_manifest

SPEC_IN = [TensorSpec(name="x", dtype="float32", shape=["batch", 3])]
SPEC_OUT = [TensorSpec(name="y", dtype="float32", shape=["batch", 3])]


def scaler(factor: float, gate: threading.Event | None = None) -> FakeModel:
    """y = x * factor; optionally held in run() until ``gate`` is set."""
    return FakeModel(SPEC_IN, SPEC_OUT, lambda f: {"y": f["x"] * factor}, gate=gate)


def serving(model: LoadedModel, version: str) -> ServingModel:
    ref = VersionRef(
        model="scaler", version=version, bundle_sha256="0" * 64, runtime="fake", precision="fp32"
    )
    manifest = served_manifest("scaler", version, SPEC_IN, SPEC_OUT)
    return ServingModel(ref, manifest, model)


@pytest.fixture
def table() -> SlotTable:
    t = SlotTable()
    t.swap("main", serving(scaler(2.0), "1.0.0"))
    return t


def post(
    srv: InferenceHTTPServer,
    path: str,
    body: bytes,
    ctype: str,
    accept: str = "",
    extra: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    headers = {"Content-Type": ctype, **(extra or {})}
    if accept:
        headers["Accept"] = accept
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


X = np.arange(6, dtype=np.float32).reshape(2, 3)


def test_json_nested_lists(server: InferenceHTTPServer) -> None:
    status, headers, data = post(
        server,
        "/v1/models/scaler:predict",
        json.dumps({"inputs": {"x": X.tolist()}}).encode(),
        "application/json",
    )
    assert status == 200, data
    doc = json.loads(data)
    assert doc["version"] == "1.0.0" and headers["X-Edgefleet-Version"] == "1.0.0"
    np.testing.assert_array_equal(np.array(doc["outputs"]["y"], dtype=np.float32), X * 2)


def test_json_base64_both_ways(server: InferenceHTTPServer) -> None:
    body = {
        "inputs": {
            "x": {
                "b64": base64.b64encode(X.tobytes()).decode(),
                "dtype": "float32",
                "shape": [2, 3],
            }
        },
        "output_encoding": "b64",
    }
    status, _, data = post(
        server, "/v1/models/main:predict", json.dumps(body).encode(), "application/json"
    )
    assert status == 200, data
    y = json.loads(data)["outputs"]["y"]
    got = np.frombuffer(base64.b64decode(y["b64"]), dtype=y["dtype"]).reshape(y["shape"])
    np.testing.assert_array_equal(got, X * 2)


def test_npy_body_and_npz_reply(server: InferenceHTTPServer) -> None:
    buf = io.BytesIO()
    np.save(buf, X)
    status, _, data = post(
        server,
        "/v1/models/scaler:predict",
        buf.getvalue(),
        "application/x-npy",
        accept="application/x-npz",
    )
    assert status == 200
    with np.load(io.BytesIO(data)) as npz:
        np.testing.assert_array_equal(npz["y"], X * 2)


TENSOR = "application/x-edgefleet-tensor"


def test_raw_tensor_both_ways(server: InferenceHTTPServer) -> None:
    # Big-endian on the wire is wrong: the body is little-endian, whatever the host.
    status, headers, data = post(
        server,
        "/v1/models/scaler:predict",
        X.astype("<f4").tobytes(),
        TENSOR,
        accept=TENSOR,
        extra={"X-Edgefleet-Dtype": "float32", "X-Edgefleet-Shape": "2,3"},
    )
    assert status == 200, data
    assert headers["Content-Type"] == TENSOR and headers["X-Edgefleet-Output"] == "y"
    assert headers["X-Edgefleet-Dtype"] == "float32" and headers["X-Edgefleet-Shape"] == "2,3"
    np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(2, 3), X * 2)


@pytest.mark.parametrize(
    ("headers", "body", "needle"),
    [
        ({"X-Edgefleet-Shape": "2,3"}, X.tobytes(), "needs the X-Edgefleet-Dtype"),
        ({"X-Edgefleet-Dtype": "float32", "X-Edgefleet-Shape": "2,4"}, X.tobytes(), "24 bytes"),
        ({"X-Edgefleet-Dtype": "object", "X-Edgefleet-Shape": "6"}, X.tobytes(), "not allowed"),
        ({"X-Edgefleet-Dtype": "float32", "X-Edgefleet-Shape": "2,x"}, X.tobytes(), "bad"),
        ({"X-Edgefleet-Dtype": "float32", "X-Edgefleet-Shape": "-2,-3"}, X.tobytes(), "negative"),
    ],
)
def test_bad_raw_tensors_name_the_input_and_the_problem(
    server: InferenceHTTPServer, headers: dict[str, str], body: bytes, needle: str
) -> None:
    status, _, data = post(server, "/v1/models/scaler:predict", body, TENSOR, extra=headers)
    assert status == 400
    err = json.loads(data)["error"]
    assert err["code"] == "input_encoding" and "input 'x'" in err["message"]
    assert needle in err["message"]


def test_python_client_round_trip(server: InferenceHTTPServer) -> None:
    client = AgentClient(f"http://127.0.0.1:{server.port}")
    np.testing.assert_array_equal(client.predict("scaler", {"x": X})["y"], X * 2)
    assert client.models()[0]["version"] == "1.0.0" and client.ready()
    with pytest.raises(RequestError, match="missing"):
        client.predict("scaler", {"z": X})
    with pytest.raises(AgentError) as e:
        client.predict("nope", {"x": X})
    assert e.value.status == 404
    client.close()


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"{not json", "application/json", 400, "input_encoding"),
        (b'{"inputs": {"x": [[1, 2]]}}', "application/json", 400, "input_shape"),
        (b'{"inputs": {"x": [["a", "b", "c"]]}}', "application/json", 400, "input_encoding"),
        (
            b'{"inputs": {"x": {"b64": "AAAA", "dtype": "float32", "shape": [2, 3]}}}',
            "application/json",
            400,
            "input_encoding",
        ),
        (b'{"inputs": {"w": [[1, 2, 3]]}}', "application/json", 400, "input_names"),
        (b"PK-not-a-zip", "application/x-npz", 400, "input_encoding"),
        (b"x", "text/plain", 400, "content_type"),
    ],
)
def test_bad_requests_say_what_is_wrong(
    server: InferenceHTTPServer, body: bytes, ctype: str, status: int, code: str
) -> None:
    got, _, data = post(server, "/v1/models/scaler:predict", body, ctype)
    assert got == status
    err = json.loads(data)["error"]
    assert err["code"] == code and err["message"]


def test_health_and_readiness(table: SlotTable) -> None:
    empty = SlotTable()
    srv, _ = start_http(empty, "127.0.0.1", 0)
    try:
        client = AgentClient(f"http://127.0.0.1:{srv.port}")
        assert not client.ready()
        empty.swap("main", serving(scaler(1.0), "1.0.0"))
        assert client.ready()
    finally:
        srv.shutdown()
        srv.server_close()


def test_swap_lets_the_in_flight_request_finish_on_the_old_model() -> None:
    table = SlotTable()
    gate = threading.Event()
    old = scaler(2.0, gate)
    table.swap("main", serving(old, "1.0.0"))
    result: dict[str, object] = {}

    def call() -> None:
        with table.use("main") as s:
            result["y"] = s.model.run({"x": X})["y"]
            result["version"] = s.ref.version

    t = threading.Thread(target=call)
    t.start()
    assert old.entered.wait(5)
    new = scaler(3.0)
    table.swap("main", serving(new, "2.0.0"))
    assert not old.closed  # still running a request
    with table.use("main") as s:  # new requests go to the new model at once
        np.testing.assert_array_equal(s.model.run({"x": X})["y"], X * 3)
    gate.set()
    t.join(5)
    assert result["version"] == "1.0.0"
    np.testing.assert_array_equal(result["y"], X * 2)  # type: ignore[arg-type]
    assert old.closed and not new.closed


def test_check_feeds_casts_only_when_safe() -> None:
    out = check_feeds(SPEC_IN, {"x": np.ones((1, 3), dtype=np.float64)})
    assert out["x"].dtype == np.float32
    spec = [TensorSpec(name="ids", dtype="int8", shape=[3])]
    assert check_feeds(spec, {"ids": np.array([1, 2, 3])})["ids"].dtype == np.int8
    with pytest.raises(RequestError, match="cannot be converted"):
        check_feeds(spec, {"ids": np.array([1, 2, 300])})
    with pytest.raises(RequestError, match="cannot be converted"):
        check_feeds(spec, {"ids": np.array([1.5, 2, 3])})


def test_the_same_api_on_a_unix_socket(table: SlotTable, tmp_path: Path) -> None:
    from edge_agent.serving import start_unix

    sock = tmp_path / "serving.sock"
    srv = start_unix(table, sock)
    try:
        assert sock.stat().st_mode & 0o777 == 0o660
        client = AgentClient(f"unix://{sock}")
        np.testing.assert_array_equal(client.predict("scaler", {"x": X})["y"], X * 2)
        assert client.models()[0]["version"] == "1.0.0" and client.ready()
    finally:
        srv.shutdown()
        srv.server_close()
    assert not sock.exists()


def test_health_names_the_active_versions(server: InferenceHTTPServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")
    assert json.loads(conn.getresponse().read()) == {"status": "ok", "slots": {"main": "1.0.0"}}


def test_check_feeds_passes_ready_arrays_through_untouched() -> None:
    ready = np.ones((2, 3), dtype=np.float32)
    assert check_feeds(SPEC_IN, {"x": ready})["x"] is ready
    strided = np.ones((2, 6), dtype=np.float32)[:, ::2]
    out = check_feeds(SPEC_IN, {"x": strided})["x"]
    assert out.flags.c_contiguous and out.shape == (2, 3)


@pytest.mark.parametrize(
    ("feeds", "reason"),
    [
        ({"z": np.ones((1, 16), np.float32)}, "input_names"),
        ({"x": np.ones((1, 16), np.float32), "z": np.ones(1, np.float32)}, "input_names"),
        ({"x": np.ones((16,), np.float32)}, "input_shape"),
        ({"x": np.ones((1, 5), np.float32)}, "input_shape"),
        ({"x": np.array([["a"] * 16])}, "input_dtype"),
    ],
)
def test_onnxruntime_refusals_become_request_errors(
    tmp_path: Path, feeds: dict[str, np.ndarray], reason: str
) -> None:
    """The onnxruntime backend hands feeds straight to the session; whatever the session
    refuses must still come back as the caller's mistake, named, never as a model failure."""
    from converters.onnx.samples import mlp_classifier
    from edge_agent.runtimes import LoadOptions, get_runtime

    model = get_runtime("onnxruntime").load(mlp_classifier(tmp_path / "m.onnx"), LoadOptions())
    with pytest.raises(RequestError) as e:
        model.run(feeds)
    assert e.value.reason == reason
    good = np.random.default_rng(0).standard_normal((2, 16))
    expected = model.run({"x": good.astype(np.float32)})["probs"]
    # JSON numbers arrive as float64 and non-contiguous views happen: both are served.
    np.testing.assert_allclose(model.run({"x": good})["probs"], expected, rtol=1e-6)
    wide = np.repeat(good.astype(np.float32), 2, axis=1)[:, ::2]
    np.testing.assert_allclose(model.run({"x": wide})["probs"], expected, rtol=1e-6)
    model.close()


def test_a_retired_model_takes_no_new_request() -> None:
    """The lock-free lookup may read a model that a swap retires a moment later: the hold is
    then refused and the request goes to the model serving now, never to a closed one."""
    table = SlotTable()
    old_model = scaler(2.0)
    old = serving(old_model, "1.0.0")
    table.swap("main", old)
    assert old._hold()  # a request that read ``old`` just before the swap
    table.swap("main", serving(scaler(3.0), "2.0.0"))
    assert not old._hold()  # retired: no new request starts on it
    assert not old_model.closed  # ... but the one in flight still runs
    old._release()
    assert old_model.closed
    held = table.acquire("scaler")  # by model name: the locked path
    assert held.ref.version == "2.0.0"
    held._release()
    table.remove("main")
    with pytest.raises(LookupError):
        table.acquire("main")


def test_nan_outputs_are_counted_per_response_in_batches() -> None:
    """NaN/inf are checked a batch of outputs at a time (off most requests' path); the count
    is still per response, exact whenever the figures are read, and outputs are read-only."""
    stats = ModelStats()
    fine = np.ones((2, 3), np.float32)
    for i in range(CHECK_BATCH * 2 + 5):
        y = fine.copy()
        if i in (3, 70, 71):
            y[0, 1] = np.nan if i != 71 else np.inf
        stats.record(0.1, outputs={"y": y, "label": np.zeros(2, np.int64)})
        assert not y.flags.writeable  # a caller cannot change what is still to be checked
    snap = stats.snapshot()  # reads the 5 not checked yet too
    assert (snap.requests, snap.nonfinite, snap.errors) == (CHECK_BATCH * 2 + 5, 3, 0)
    stats.record(0.1, outputs={"y": np.full((1, 3), -np.inf, np.float32)})
    assert stats.nonfinite == 4
    big = np.zeros(CHECK_BATCH_BYTES // 4, np.float32)
    big[-1] = np.nan
    stats.record(0.1, outputs={"y": big})  # alone over the byte limit: checked at once
    assert stats._nonfinite == 5 and not stats._unchecked


def _raw_exchange(srv: InferenceHTTPServer, request: bytes, *, wait_close: bool = True) -> bytes:
    """Send ``request`` as it is; everything the server sends until it closes (or pauses)."""
    with socket.create_connection(
        ("127.0.0.1", srv.port), timeout=2 if wait_close else 0.5
    ) as sock:
        sock.sendall(request)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            assert not wait_close, f"the server kept the connection open after: {got[:200]!r}"
        return got


def _tensor_request(extra: str = "", *, version: str = "HTTP/1.1", lower: bool = False) -> bytes:
    body = X.tobytes()
    head = (
        f"POST /v1/models/scaler:predict {version}\r\nHost: x\r\n"
        f"Content-Type: {codec.TENSOR}\r\nAccept: {codec.TENSOR}\r\n"
        f"X-Edgefleet-Dtype: float32\r\nX-Edgefleet-Shape: 2,3\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    if lower:
        line, _, rest = head.partition("\r\n")
        head = f"{line}\r\n{rest.lower()}"
    return head.encode() + body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_tensor_request("Connection: close\r\n"), b"200"),
        (
            _tensor_request(lower=True) + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"200",
        ),
        (_tensor_request(version="HTTP/1.0"), b"200"),  # 1.0: one request per connection
        (_tensor_request("Bad Header: 1\r\n"), b"400"),
        (_tensor_request("no colon here\r\n"), b"400"),
        (_tensor_request(" folded: 1\r\n"), b"400"),
        (_tensor_request("Content-Length: 1\r\n"), b"400"),  # two lengths: smuggling
        (_tensor_request("X-Long: " + "a" * 70000 + "\r\n"), b"431"),
        (_tensor_request("".join(f"X-H{i}: 1\r\n" for i in range(101))), b"431"),
        (b"GET /healthz HTTP/1.1 x\r\n\r\n", b"400"),  # an unusual request line: the stdlib's
        (b"GET /healthz HTTP/2.0\r\n\r\n", b"505"),
        (
            b"POST /v1/models/scaler:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            b"411",
        ),
    ],
)
def test_request_heads_are_read_strictly(
    server: InferenceHTTPServer, request_bytes: bytes, status: bytes
) -> None:
    """The agent reads request heads itself (faster than the stdlib's email parser), with the
    same limits, and closes the connection whenever what follows cannot be trusted."""
    reply = _raw_exchange(server, request_bytes)
    assert reply.startswith(b"HTTP/1.") and reply.split(b" ")[1] == status, reply[:300]
    if status == b"200":
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert b"x-edgefleet-version: 1.0.0" in head.lower()
        np.testing.assert_array_equal(np.frombuffer(rest[: X.nbytes], np.float32), X.ravel() * 2)


def test_header_names_are_case_insensitive_and_kept_alive(server: InferenceHTTPServer) -> None:
    reply = _raw_exchange(server, _tensor_request(lower=True) * 2, wait_close=False)
    assert reply.count(b"HTTP/1.1 200 OK") == 2  # two answers on one connection, still open
    assert b"Date: " in reply and b"Server: edgefleet-agent/" in reply


def test_expect_100_continue(server: InferenceHTTPServer) -> None:
    request = _tensor_request("Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
