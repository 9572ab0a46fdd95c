"""Serving overhead: the same model called five ways, side by side in one run.

The model goes through the server like any other (built for x86-64-avx2, signed, rolled out
to a real agent process); every path runs the artifact that build produced.

- raw:        onnxruntime InferenceSession.run on the bundle's model file
- in-process: the agent's serving path (slot lookup, refcount, stats, NaN check) around it
- http:       the agent process, Python client (raw tensor encoding), HTTP/1.1 keep-alive
- unix:       the same agent, same client, over its Unix socket
- http, socket: the HTTP path with a minimal client (pre-encoded request, raw socket): the
                agent's own share of the overhead, as a C or Go client would see it

All five are called from one process that holds nothing else, as an app's would (not the one
running the server and its threads), and take turns in blocks of calls, so that none gets the
quieter part of the run. The
agent also reports its own timing of each model call (``X-Edgefleet-Latency-Ms``): the HTTP
path minus that is what HTTP, the codecs and the client add, apart from how fast the model
itself runs in the agent process (its caches see the client and the server run in between).

Also: swap time (rollout created → new version answering, via the server and MQTT) and the
agent process's idle RSS. Median and p99 of N calls each.

Run: .venv/bin/python bench/serving_latency.py [--calls 2000] [--hidden 4096] [--batch 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import timing
from bench.served import status_mib
from converters.onnx.samples import mlp_classifier
from edge_agent.bundle import open_bundle
from edge_agent.protocol.status import VersionRef
from edge_agent.runtimes import LoadOptions, get_runtime
from edge_agent.serving import ServingModel, SlotTable, predict
from edge_agent.serving.client import AgentClient
from fleet_server.artifacts.local import LocalArtifactStore
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, wait_until

#: Each path runs in blocks of this many calls, the first ``BLOCK_WARMUP`` not counted: a path
#: is measured warm, as it is under steady traffic (call-by-call alternation would hand each
#: path the caches the previous one left, and order would decide the figures), while the
#: blocks take turns, so every path meets the same moments of a noisy machine.
BLOCK, BLOCK_WARMUP = 20, 5


def interleaved(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, tuple[float, float]]:
    """Median and p99 (ms) of ``calls`` counted calls of each function, taking turns in blocks."""
    samples = timing.interleaved(fns, calls, block=BLOCK, warmup=BLOCK_WARMUP)
    rows = {}
    for name, got in samples.items():
        got = sorted(s * 1000 for s in got)
        rows[name] = (statistics.median(got), got[int(0.99 * len(got)) - 1])
    return rows


def local_paths(
    bundle: Path, work: Path, x: np.ndarray
) -> tuple[dict[str, Callable[[], object]], SlotTable, str]:
    """Raw ``InferenceSession.run`` and the agent's in-process path on the bundle's artifact."""
    with open_bundle(bundle) as reader:
        reader.extract_verified(work)
        manifest = reader.manifest
    loaded = get_runtime("onnxruntime").load(work / manifest.artifact, LoadOptions(threads=1))
    raw_session = loaded._session  # type: ignore[attr-defined]
    names = [o.name for o in raw_session.get_outputs()]
    table = SlotTable()
    ref = VersionRef(
        model="m", version="1", bundle_sha256=bundle.name, runtime="onnxruntime",
        precision=manifest.precision,
    )  # fmt: skip
    table.swap("m", ServingModel(ref, manifest, loaded))
    fns: dict[str, Callable[[], object]] = {
        "raw": lambda: raw_session.run(names, {"x": x}),
        "in-process": lambda: predict(table, "m", {"x": x}),
    }
    return fns, table, manifest.precision


def call_all_paths(
    bundle: Path, work: Path, x: np.ndarray, port: int, socket_path: str, calls: int
) -> tuple[dict[str, tuple[float, float]], list[float], str]:
    """In the caller process: every path, taking turns; also the agent's own model timings."""
    fns, table, precision = local_paths(bundle, work, x)
    http = AgentClient(f"http://127.0.0.1:{port}")
    unix = AgentClient(f"unix://{socket_path}")
    raw_http = RawHttp(port, x)
    fns["http"] = lambda: http.predict("m", {"x": x})
    fns["unix"] = lambda: unix.predict("m", {"x": x})
    fns["http, socket"] = raw_http.call
    rows = interleaved(fns, calls)
    for closing in (raw_http, http, unix, table):
        closing.close()
    return rows, raw_http.agent_ms, precision


class RawHttp:
    """The agent's HTTP path with the client's cost taken out: one pre-encoded request on a
    kept-alive socket, the reply read by its Content-Length (what a C or Go client costs).
    Also keeps the agent's own timing of each model call (``X-Edgefleet-Latency-Ms``)."""

    def __init__(self, port: int, x: np.ndarray) -> None:
        import socket

        from edge_agent.serving import codec

        body, headers = codec.encode_tensor(x)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (
            f"POST /v1/models/m:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {codec.TENSOR}\r\nAccept: {codec.TENSOR}\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.agent_ms: list[float] = []

    def call(self) -> None:
        self.sock.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        latency = head.lower().split(b"x-edgefleet-latency-ms:")[1].split(b"\r\n")[0]
        self.agent_ms.append(float(latency))

    def close(self) -> None:
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=4096, help="MLP width (sets the model cost)")
    parser.add_argument("--batch", type=int, default=32, help="rows per call (~1 ms by default)")
    parser.add_argument("--swaps", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    model = mlp_classifier(root / "m.onnx", features=256, hidden=args.hidden, seed=1)
    x = np.random.default_rng(0).standard_normal((args.batch, 256)).astype(np.float32)

    stack = EmbeddedStack(Settings(data_dir=root / "server", port=0, broker_port=0)).start()
    agent = None
    try:
        api = ApiClient(stack.url, stack.admin_token)
        api.upload_model(model, "m", "1.0.0")
        api.upload_model(
            mlp_classifier(root / "m2.onnx", features=256, hidden=args.hidden, seed=2), "m", "2.0.0"
        )
        token = api.post("/v1/enrollment-tokens", json={})["token"]
        agent = LocalAgent(root / "devices", "bench-agent", "x86-64-avx2", probation_window_s=0.2)
        agent.enroll(stack.url, token)
        agent.configure("[runtime]\nthreads = 1\n")
        agent.start()
        agent.wait_ready()
        r = api.post(
            "/v1/rollouts", json={"model": "m", "version": "1.0.0", "devices": ["bench-agent"]}
        )
        wait_until(lambda: api.get(f"/v1/rollouts/{r['id']}")["state"] == "completed", 60, "v1")
        # Raw and in-process calls run the very artifact the agent serves (the build may have
        # chosen int8 or an optimised fp32).
        sha = api.get(f"/v1/rollouts/{r['id']}")["targets"][0]["bundle_sha256"]
        # Every path is called from a process of its own that holds nothing else (an app
        # calling the agent): this one runs the server, whose threads would take turns with
        # the calls for Python's interpreter lock and bill them for it.
        bundle = LocalArtifactStore(stack.settings.artifacts_dir).path(sha)
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as caller:
            rows, agent_ms, precision = caller.submit(
                call_all_paths,
                bundle,
                root / "local",
                x,
                agent.serving_port,
                str(agent.socket_path),
                args.calls,
            ).result()
        unix = AgentClient(f"unix://{agent.socket_path}")
        inside = statistics.median(agent_ms)
        assert agent.process is not None
        idle_rss = status_mib(agent.process.pid)

        swaps = []
        for i in range(args.swaps):
            version = "2.0.0" if i % 2 == 0 else "1.0.0"
            t0 = time.perf_counter()
            r = api.post(
                "/v1/rollouts", json={"model": "m", "version": version, "devices": ["bench-agent"]}
            )
            wait_until(lambda v=version: unix.models()[0]["version"] == v, 60, "swap")
            swaps.append((time.perf_counter() - t0) * 1000)
            wait_until(
                lambda r=r: api.get(f"/v1/rollouts/{r['id']}")["state"] != "in_progress", 60, "end"
            )
            done = api.get(f"/v1/rollouts/{r['id']}")
            if done["state"] != "completed":
                raise RuntimeError(f"swap {i} to {version}: {done['state']}: {done['targets']}")
    finally:
        if agent is not None:
            agent.stop()
        stack.stop()

    base = rows["raw"][0]
    print(
        f"model: MLP 256→{args.hidden}→4 as built for x86-64-avx2 ({precision}), 1 thread, "
        f"batch {args.batch}; {args.calls} calls"
    )
    print(f"{'path':<14}{'p50 ms':>10}{'p99 ms':>10}  overhead p50")
    for name, (p50, p99) in rows.items():
        over = "" if name == "raw" else f"+{p50 - base:.3f} ms ({(p50 / base - 1) * 100:+.0f}%)"
        print(f"{name:<14}{p50:>10.3f}{p99:>10.3f}  {over}")
    print(
        f"the agent's own timing of the model call (X-Edgefleet-Latency-Ms) p50 {inside:.3f} ms: "
        f"HTTP + codec + client account for {rows['http'][0] - inside:.3f} ms of the HTTP path "
        f"(the minimal client: {rows['http, socket'][0] - inside:.3f} ms)"
    )
    swap_ms = statistics.median(swaps)
    print(f"swap (rollout → new version answering), median of {len(swaps)}: {swap_ms:.0f} ms")
    print(f"agent idle RSS with one model loaded: {idle_rss:.0f} MiB")
    inproc, http_p50, unix_p50 = rows["in-process"][0], rows["http"][0], rows["unix"][0]
    socket_p50 = rows["http, socket"][0]
    print(
        f"SUMMARY raw {base:.3f} ms; in-process +{(inproc / base - 1) * 100:.1f}%; "
        f"HTTP +{http_p50 - base:.3f} ms (minimal client +{socket_p50 - base:.3f} ms; beyond the "
        f"agent's model call +{http_p50 - inside:.3f} ms); "
        f"unix +{unix_p50 - base:.3f} ms (p50); "
        f"swap {statistics.median(swaps):.0f} ms; idle RSS {idle_rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()
