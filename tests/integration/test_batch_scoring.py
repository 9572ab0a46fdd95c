"""``edge-agent score``: files through the running agent's model over its real Unix socket,
with real onnxruntime sessions; the CLI as a subprocess, results checked against the raw
runtime, the telemetry counted under the ``batch`` role."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from converters.onnx.samples import mlp_classifier
from edge_agent import scoring
from edge_agent.bundle import TensorSpec
from edge_agent.contracts.errors import ConfigError, EdgefleetError
from edge_agent.protocol.status import VersionRef
from edge_agent.protocol.telemetry import TelemetryBatch
from edge_agent.runtimes.fake import FakeModel
from edge_agent.serving import InferenceUnixServer, ServingModel, SlotTable, start_unix
from edge_agent.serving.client import AgentClient
from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.reporter import TelemetryReporter, TelemetrySettings
from tests.factories import onnx_serving, served_manifest

FEATURES = 16


@dataclass
class Agent:
    """The agent's serving half, in-process: a slot table behind the real Unix socket, and a
    telemetry reporter tracking what serves (as the daemon wires them)."""

    table: SlotTable
    config: Path
    socket: Path
    reporter: TelemetryReporter
    v1: Path
    v2: Path

    def client(self) -> AgentClient:
        return AgentClient(f"unix://{self.socket}", timeout_s=30)

    def batch_figures(self) -> list[dict[str, object]]:
        self.reporter.close_interval()
        out = []
        for seq in self.reporter.outbox.pending():
            data = self.reporter.outbox.read(seq)
            assert data is not None
            out += [s.to_dict() for s in TelemetryBatch.from_bytes(data).slots]
        return [s for s in out if s["role"] == "batch"]


def serve_fake(sock: Path, name: str, model: FakeModel) -> InferenceUnixServer:
    """``model`` served as ``name`` 1.0.0 behind a real Unix socket at ``sock``."""
    ref = VersionRef(
        model=name, version="1.0.0", bundle_sha256="1" * 64, runtime="fake", precision="fp32"
    )
    table = SlotTable()
    manifest = served_manifest(name, "1.0.0", model.inputs, model.outputs)
    table.swap(name, ServingModel(ref, manifest, model))
    return start_unix(table, sock)


def agent_config(directory: Path, sock: Path) -> Path:
    """An agent.toml whose serving socket is ``sock`` (beside it): what ``edge-agent score``
    reads to find the agent; nothing else in it is reached."""
    config = directory / "agent.toml"
    config.write_text(
        'device_id = "dev-1"\nprofile = "x86-64-avx2"\nstate_dir = "state"\n'
        '[server]\nurl = "http://127.0.0.1:1"\ncredential_file = "device.secret"\n'
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n[trust]\nroot_key_file = "root.pub"\n'
        f'[serving]\nport = 1\nunix_socket = "{sock.name}"\n'
    )
    return config


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    v1 = mlp_classifier(tmp_path / "v1.onnx", seed=3)
    v2 = mlp_classifier(tmp_path / "v2.onnx", seed=4)
    table = SlotTable()
    reporter = TelemetryReporter(
        "dev-1", Outbox(tmp_path / "outbox"), TelemetrySettings(), publish=lambda b: True
    )
    table.on_serving = reporter.track
    table.swap("clf", onnx_serving(v1, "1.0.0"))
    sock = tmp_path / "serving.sock"
    server = start_unix(table, sock)
    config = agent_config(tmp_path, sock)
    try:
        yield Agent(table, config, sock, reporter, v1, v2)
    finally:
        server.shutdown()
        server.server_close()
        table.close()


def write_inputs(directory: Path, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` files: single samples (.npy, no batch axis) and files of several rows (.npz
    with the batch axis). Returns each file's rows."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: dict[str, np.ndarray] = {}
    for i in range(count):
        if i % 5 == 4:
            x = rng.standard_normal((3, FEATURES)).astype(np.float32)
            path = directory / f"f{i:04d}.npz"
            np.savez(path, x=x)
        else:
            x = rng.standard_normal(FEATURES).astype(np.float32)
            path = directory / f"f{i:04d}.npy"
            np.save(path, x)
            x = x[np.newaxis]
        rows[str(path.resolve())] = x
    return rows


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def raw(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


def test_score_writes_every_row_with_its_version_names_bad_files_and_counts_batch_telemetry(
    agent: Agent, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    rows = write_inputs(inputs, 60)
    (inputs / "zz-not-an-array.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    np.save(inputs / "zz-wrong-width.npy", np.zeros(FEATURES + 1, np.float32))
    np.savez(inputs / "zz-wrong-name.npz", y=np.zeros(FEATURES, np.float32))
    (inputs / "notes.txt").write_text("not an input: ignored")
    out = tmp_path / "scores.npz"

    done = run_cli(
        "score", "--config", str(agent.config), "--model", "classifier", "--in", str(inputs),
        "--out", str(out), "--batch-size", "16",
    )  # fmt: skip

    assert done.returncode == 1, done.stderr  # three files failed: the run says so
    assert "scored 60 file(s), 84 row(s)" in done.stdout, done.stdout
    assert "1.0.0 (84 rows)" in done.stdout
    for bad, reason in (
        ("zz-not-an-array.npy", "input_encoding"),
        ("zz-wrong-width.npy", "shape"),
        ("zz-wrong-name.npz", "input_names"),
    ):
        assert bad in done.stderr and reason in done.stderr, done.stderr
    failed = [json.loads(line) for line in out.with_name("scores.npz.failed.jsonl").open()]
    assert sorted(Path(f["file"]).name for f in failed) == [
        "zz-not-an-array.npy", "zz-wrong-name.npz", "zz-wrong-width.npy",
    ]  # fmt: skip
    assert not out.with_name("scores.npz.partial").exists()

    with np.load(out, allow_pickle=False) as npz:
        got = {k: npz[k] for k in npz.files}
    assert len(got["file"]) == 84
    assert set(got["version"].tolist()) == {"1.0.0"}
    assert set(got["model"].tolist()) == {"classifier"}
    for file, x in rows.items():
        mine = got["file"] == file
        assert got["row"][mine].tolist() == list(range(len(x)))
        np.testing.assert_allclose(got["output/probs"][mine], raw(agent.v1, x), atol=1e-6)

    # Counted as the batch role, apart from online requests, every row's request included.
    served = agent.table.snapshot()["clf"]
    assert served.stats.snapshot().requests == 0
    batch = agent.batch_figures()
    assert len(batch) == 1 and batch[0]["version"] == "1.0.0"
    assert batch[0]["requests"] == served.lanes["batch"].stats.snapshot().requests >= 5
    assert batch[0]["errors"] == 0

    # Run again: nothing left to do, and the output is unchanged.
    again = run_cli(
        "score", "--config", str(agent.config), "--model", "classifier", "--in", str(inputs),
        "--out", str(out), "--quiet",
    )  # fmt: skip
    assert "scored 0 file(s), 0 row(s)" in again.stdout and "60 already in" in again.stdout
    with np.load(out, allow_pickle=False) as npz:
        assert len(npz["file"]) == 84


def test_an_interrupted_run_resumes_without_scoring_a_file_twice(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = write_inputs(tmp_path / "in", 40, seed=1)
    files = scoring.find_inputs(str(tmp_path / "in"))
    out = tmp_path / "scores.npz"
    monkeypatch.setattr(scoring, "PART_ROWS", 8)

    class Interrupted(Exception):
        pass

    scored_before: list[int] = []

    def stop_midway(result: scoring.ScoreResult, todo: int, final: bool) -> None:
        if result.scored_files >= 20:
            scored_before.append(result.scored_files)
            raise Interrupted

    with pytest.raises(Interrupted):
        scoring.Scorer(agent.client(), "classifier", out, batch_size=4, progress=stop_midway).run(
            files
        )
    assert not out.exists()
    parts = sorted((tmp_path / "scores.npz.partial").glob("part-*.npz"))
    assert len(parts) >= 2, "rows are written in parts as the run goes"
    kept = scoring.Scorer(agent.client(), "classifier", out).done_files()
    assert len(kept) == scored_before[0]  # everything scored before it stopped is kept

    before = agent.table.snapshot()["clf"].lanes["batch"].stats.snapshot().requests
    result = scoring.Scorer(agent.client(), "classifier", out, batch_size=4).run(files)
    assert result.skipped == len(kept)
    assert result.scored_files == 40 - len(kept)
    assert not result.failures

    with np.load(out, allow_pickle=False) as npz:
        got = {k: npz[k] for k in npz.files}
    assert sorted(set(got["file"].tolist())) == sorted(rows)
    assert len(got["file"]) == sum(len(x) for x in rows.values())  # no row twice
    for file, x in rows.items():
        np.testing.assert_allclose(
            got["output/probs"][got["file"] == file], raw(agent.v1, x), atol=1e-6
        )
    resumed = agent.table.snapshot()["clf"].lanes["batch"].stats.snapshot().requests - before
    assert resumed <= (40 - len(kept)) // 2 + 4  # only the files left, in batches


def test_a_swap_mid_run_is_recorded_row_by_row_and_parquet_holds_the_same(
    agent: Agent, tmp_path: Path
) -> None:
    rows = write_inputs(tmp_path / "in", 30, seed=2)
    files = scoring.find_inputs(str(tmp_path / "in"))
    out = tmp_path / "scores.parquet"
    swapped = False

    def swap_midway(result: scoring.ScoreResult, todo: int, final: bool) -> None:
        nonlocal swapped
        if result.scored_files >= 12 and not swapped:
            agent.table.swap("clf", onnx_serving(agent.v2, "2.0.0"))
            swapped = True

    result = scoring.Scorer(
        agent.client(), "classifier", out, batch_size=4, progress=swap_midway
    ).run(files)
    assert not result.failures and set(result.versions) == {"1.0.0", "2.0.0"}

    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.column_names[:4] == ["file", "row", "model", "version"]
    got = scoring._from_parquet(out)
    for file, x in rows.items():
        mine = got["file"] == file
        versions = set(got["version"][mine].tolist())
        assert len(versions) == 1  # a file's rows travel in one request
        model = agent.v1 if versions == {"1.0.0"} else agent.v2
        np.testing.assert_allclose(got["output/probs"][mine], raw(model, x), atol=1e-6)
    # Each version's batch figures, under its own version.
    figures = {f["version"]: f["requests"] for f in agent.batch_figures()}
    assert set(figures) == {"1.0.0", "2.0.0"} and all(n > 0 for n in figures.values())


def test_predict_rows_sends_parts_as_the_rows_of_one_tensor(agent: Agent) -> None:
    """The scorer's large files go out as they are (no copy into one array): the agent sees
    one tensor. 600 parts take more than one sendmsg; 2 MiB more than a socket buffer."""
    client = agent.client()
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal((1 + i % 3, FEATURES)).astype(np.float32) for i in range(600)]
    parts.append(rng.standard_normal((32768, FEATURES)).astype(np.float32))  # 2 MiB
    got = client.predict_rows("classifier", "x", parts, workload="batch")["probs"]
    np.testing.assert_allclose(got, raw(agent.v1, np.concatenate(parts)), atol=1e-6)
    assert client.last_version == "1.0.0"
    # a part that is a strided view, not C-ordered bytes; both big-endian
    mixed = [parts[0].astype(">f4"), parts[1][:, ::-1].astype(">f4")[:, ::-1]]
    want = raw(agent.v1, np.concatenate(mixed).astype(np.float32))
    got = client.predict_rows("classifier", "x", mixed)["probs"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    for bad in ([], [parts[0], parts[1].astype(np.float64)], [parts[0], parts[1][:, :4]]):
        with pytest.raises(ValueError):
            client.predict_rows("classifier", "x", bad)


def test_rows_come_out_in_the_files_order_whatever_the_number_of_workers(
    agent: Agent, tmp_path: Path
) -> None:
    rows = write_inputs(tmp_path / "in", 50, seed=5)
    files = scoring.find_inputs(str(tmp_path / "in"))
    want_files = [f for f in sorted(rows) for _ in range(len(rows[f]))]
    # Batches of one file: 50 files make three batches a chunk for one worker (a long run's
    # chunks, several requests each), and one for three workers.
    assert scoring._chunk_files(50, 1, 1) == 3 and scoring._chunk_files(50, 1, 3) == 1
    assert scoring._chunk_files(100_000, 64, 2) == 64 * scoring.CHUNK_BATCHES
    for workers, batch in ((1, 4), (3, 4), (1, 1), (3, 1)):
        out = tmp_path / f"w{workers}-{batch}.npz"
        result = scoring.Scorer(
            agent.client(), "classifier", out, batch_size=batch, workers=workers
        )
        assert result.run(files).scored_files == 50
        with np.load(out) as npz:
            assert npz["file"].tolist() == want_files
            assert npz["row"].tolist() == [r for f in sorted(rows) for r in range(len(rows[f]))]
            np.testing.assert_allclose(
                npz["output/probs"], raw(agent.v1, np.concatenate([rows[f] for f in sorted(rows)])),
                atol=1e-6,
            )  # fmt: skip
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        scoring.Scorer(agent.client(), "classifier", tmp_path / "x.npz", workers=0)


def test_a_worker_killed_mid_run_stops_it_in_one_error_and_the_next_run_finishes(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies (the OOM killer, a segfault in a decoder) takes the chunk it held
    with it: the run stops and says which worker, rather than waiting for that chunk
    forever; what was written is kept, and the next run scores the rest, each file once."""
    rows = write_inputs(tmp_path / "in", 60, seed=6)
    files = scoring.find_inputs(str(tmp_path / "in"))
    out = tmp_path / "scores.npz"
    monkeypatch.setattr(scoring, "PART_ROWS", 4)
    killed: list[int] = []

    def kill_a_worker(result: scoring.ScoreResult, todo: int, final: bool) -> None:
        if result.scored_files >= 12 and not killed:
            workers = [p for p in multiprocessing.active_children() if "score" in p.name]
            assert workers, multiprocessing.active_children()
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)

    scorer = scoring.Scorer(
        agent.client(), "classifier", out, batch_size=4, workers=2, progress=kill_a_worker
    )
    with pytest.raises(EdgefleetError, match=r"scoring worker edge-agent-score-\d died"):
        scorer.run(files)
    assert killed and not out.exists()
    kept = scoring.Scorer(agent.client(), "classifier", out).done_files()
    assert len(kept) >= 12
    assert not [p for p in multiprocessing.active_children() if "score" in p.name]

    result = scoring.Scorer(agent.client(), "classifier", out, batch_size=4).run(files)
    assert result.skipped == len(kept) and result.scored_files == 60 - len(kept)
    with np.load(out) as npz:
        assert sorted(npz["file"].tolist()) == sorted(f for f in rows for _ in rows[f])


def test_a_model_without_a_batch_axis_is_scored_file_by_file(tmp_path: Path) -> None:
    """Recurrent state and scalars: inputs of fixed shape are sent as they are, one file per
    request, and each file is one row of the results."""
    spec_in = [
        TensorSpec(name="state", dtype="float32", shape=[4]),
        TensorSpec(name="gain", dtype="float32", shape=[]),
    ]
    spec_out = [TensorSpec(name="next", dtype="float32", shape=[4])]
    fake = FakeModel(spec_in, spec_out, lambda f: {"next": f["state"] * f["gain"]})
    sock = tmp_path / "s.sock"
    server = serve_fake(sock, "rnn", fake)
    try:
        (tmp_path / "in").mkdir()
        for i in range(5):
            np.savez(
                tmp_path / "in" / f"{i}.npz",
                state=np.full(4, i, np.float32),
                gain=np.float32(2.0),
            )
        np.save(tmp_path / "in" / "x.npy", np.zeros(4, np.float32))  # two inputs: needs .npz
        out = tmp_path / "o.npz"
        result = scoring.Scorer(AgentClient(f"unix://{sock}"), "rnn", out).run(
            scoring.find_inputs(str(tmp_path / "in"))
        )
    finally:
        server.shutdown()
        server.server_close()
    assert [f.reason for f in result.failures] == ["input_count"]
    with np.load(out) as npz:
        assert npz["output/next"].shape == (5, 4)
        assert npz["output/next"][:, 0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
        assert npz["row"].tolist() == [0] * 5


def test_score_refuses_what_it_cannot_do_in_one_line_and_writes_nothing(
    agent: Agent, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    write_inputs(inputs, 3)
    cases = [
        (["--out", str(tmp_path / "o.csv")], 2, "write .npz or .parquet"),
        (["--in", str(tmp_path / "nothing-*.npy")], 2, "no .npy or .npz files"),
        (["--model", "no-such-model"], 1, "no model or slot named"),
    ]
    for extra, code, words in cases:
        args = {"--in": str(inputs), "--out": str(tmp_path / "o.npz"), "--model": "classifier"}
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            args[flag] = value
        done = run_cli(
            "score", "--config", str(agent.config), *[x for kv in args.items() for x in kv]
        )
        assert done.returncode == code, (extra, done.stdout, done.stderr)
        assert words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not list(tmp_path.glob("o.*"))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(b"\xff\xd8")
    done = run_cli(
        "score", "--config", str(agent.config), "--model", "classifier",
        "--in", str(tmp_path / "pics"), "--out", str(tmp_path / "o.npz"),
    )  # fmt: skip
    assert done.returncode == 2 and "convert them to arrays" in done.stderr


def _processes_naming(path: Path) -> str:
    return subprocess.run(
        ["pgrep", "-af", str(path)], capture_output=True, text=True
    ).stdout.strip()


_DEFAULT_SIGINT = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'edge-agent'; runpy.run_module('edge_agent.cli', run_name='__main__')"
)


@pytest.mark.parametrize("stop", ["ctrl-c", "kill -9"])
def test_a_stopped_command_leaves_no_worker_and_the_next_run_finishes(
    tmp_path: Path, stop: str
) -> None:
    """``edge-agent score`` as a person runs it, stopped while requests wait in the agent.
    Ctrl-C: it exits 130 in one message, the rows it had are kept. ``kill -9`` (the OOM
    killer): its workers notice and go. Either way no worker process outlives it, and the
    same command run again scores each remaining file once."""
    spec_in = [TensorSpec(name="x", dtype="float32", shape=["batch", 4])]
    spec_out = [TensorSpec(name="y", dtype="float32", shape=["batch", 4])]
    release = threading.Event()

    def hold() -> float:  # the first 10 requests are answered; the rest wait in the agent
        if fake.runs > 10:
            release.wait(60)
        return 0.0

    fake = FakeModel(spec_in, spec_out, latency_s=hold)
    sock = tmp_path / "serving.sock"
    server = serve_fake(sock, "m", fake)
    config = agent_config(tmp_path, sock)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(120):
        np.save(inputs / f"{i:04d}.npy", np.full(4, i, np.float32))
    out = tmp_path / "scores.npz"
    # A terminal's Ctrl-C reaches a command whose SIGINT is at its default. One started in
    # the background by a shell without job control (a CI runner, say) inherits it ignored,
    # and Python then keeps ignoring it: the command sets it back first, as a terminal has it.
    command = [
        sys.executable, "-c", _DEFAULT_SIGINT, "score", "--config", str(config),
        "--model", "m", "--in", str(inputs), "--out", str(out), "--batch-size", "2", "--quiet",
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while fake.runs <= 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # the command keeps the answers it has; it can get no more
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # the whole foreground group gets it
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 130, stderr
            assert "interrupted; scored rows so far are kept" in stderr, stderr
            assert "Traceback" not in stderr, stderr
        else:
            proc.kill()  # the command alone: its workers are left to notice
            proc.wait(30)  # (its workers hold its output pipes open: not read to the end)
            for pipe in (proc.stdout, proc.stderr):
                assert pipe is not None
                pipe.close()
        release.set()  # the requests held in the agent are answered, to nobody
        deadline = time.monotonic() + 30
        while (left := _processes_naming(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"worker processes left behind: {left}"
        assert not out.exists()
        kept = scoring.Scorer(AgentClient(f"unix://{sock}"), "m", out).done_files()
        assert len(kept) < 120 and (stop == "kill -9" or kept)

        again = run_cli(*command[3:])
        assert again.returncode == 0, again.stderr
        assert f"scored {120 - len(kept)} file(s)" in again.stdout, again.stdout
        with np.load(out) as npz:
            files = npz["file"].tolist()
            assert sorted(files) == sorted(str((inputs / f"{i:04d}.npy").resolve())
                                           for i in range(120))  # fmt: skip
            assert npz["output/y"][:, 0].tolist() == [float(Path(f).stem) for f in files]
    finally:
        release.set()
        server.shutdown()
        server.server_close()
