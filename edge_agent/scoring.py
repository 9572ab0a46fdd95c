"""Batch scoring: ``edge-agent score`` runs a directory of input files through the model the
running agent serves, and writes every row's outputs with the version that produced it.

The files are read by worker processes (two by default) and go through the agent's local
API (its Unix socket, else its TCP port) as ``batch``-workload requests: the agent keeps
ownership of the model, a rollout may swap it mid-run (each row says which version answered
it), and the figures are counted in the fleet's telemetry under the ``batch`` role, apart
from online requests.

Inputs: ``.npy`` files (a model with one input) and ``.npz`` files (one array per input name);
image files (JPEG, PNG, BMP, WebP) when the bundle says how to preprocess them (its manifest's
``preprocess``, from ``edgefleet models annotate``; decoding needs Pillow).
When every input's first dimension is dynamic (a batch axis), a file holds one sample (an
array without the batch axis) or several rows (with it), and rows of several files travel in
one request of up to ``batch_size`` rows. Otherwise (fixed shapes, recurrent state, scalars)
each file is one request, sent as it is, and is one row of the results.

Results: ``OUT.npz`` (arrays ``file``, ``row``, ``model``, ``version`` and ``output/NAME``,
one entry per row) or ``OUT.parquet`` (the same columns, each output a fixed-size list of its
flattened values; shapes and dtypes in the schema's ``edgefleet`` metadata; needs pyarrow).
While the run goes on, scored rows are written in parts to ``OUT.partial/``, each part whole
or not at all; a run that is interrupted and started again skips every file already in a part
or in ``OUT``, and the final file is replaced whole. A file that cannot be read or does not fit
the model is counted and named, and the run goes on; it is tried again by the next run.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import ConfigError, EdgefleetError, RequestError, TransportError
from edge_agent.serving import codec
from edge_agent.serving.client import AgentClient, AgentError

__all__ = ["FileFailure", "ScoreResult", "Scorer", "find_inputs", "load_file"]

INPUT_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OUTPUT_SUFFIXES = (".npz", ".parquet")
#: Largest input file read (what the agent's API takes in one request).
MAX_FILE_BYTES = 256 << 20
#: Scored rows are written as a part this often (seconds) or at this many rows: an
#: interruption loses at most this much work.
PART_EVERY_S = 10.0
PART_ROWS = 50_000
#: A file's array at least this large is sent as it is, beside the others of its request;
#: smaller ones are copied into one (a view of each costs more than copying a few KiB).
SCATTER_BYTES = 16 << 10


@dataclass(frozen=True)
class FileFailure:
    file: str
    reason: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason, "message": self.message}


@dataclass
class ScoreResult:
    total_files: int = 0
    #: Files already in the output (or in a part) when the run began.
    skipped: int = 0
    scored_files: int = 0
    rows: int = 0
    seconds: float = 0.0
    versions: dict[str, int] = field(default_factory=dict)
    failures: list[FileFailure] = field(default_factory=list)


def find_inputs(pattern: str) -> list[Path]:
    """A directory's ``.npy``, ``.npz`` and image files (not recursive), or a glob's matches,
    sorted; other files are left alone."""
    path = Path(pattern)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file())
    else:
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    wanted = INPUT_SUFFIXES + IMAGE_SUFFIXES
    return [p.resolve() for p in found if p.suffix.lower() in wanted]


def is_image(path: str | Path) -> bool:
    # A string's end, not pathlib's suffix: a million files' suffixes, worked out one by one,
    # take longer than reading a small file.
    return str(path).lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class _Model:
    """What the scorer needs to know of the serving model's inputs."""

    names: list[str]
    ranks: dict[str, int]
    dtypes: dict[str, str]
    #: Every input's first dimension is a batch axis: files' rows travel together.
    batchable: bool
    preprocess: dict[str, Any] | None

    @classmethod
    def of(cls, described: dict[str, Any]) -> _Model:
        specs = described.get("inputs") or []
        return cls(
            names=[str(s["name"]) for s in specs],
            ranks={str(s["name"]): len(s["shape"]) for s in specs},
            dtypes={str(s["name"]): str(s["dtype"]) for s in specs},
            batchable=bool(specs)
            and all(len(s["shape"]) >= 1 and not isinstance(s["shape"][0], int) for s in specs),
            preprocess=described.get("preprocess"),
        )


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise ConfigError(
            "scoring image files needs Pillow: pip install 'edgefleet[agent,images]'"
        ) from e
    return Image


#: Images larger than this are refused before they are decoded (a decompression bomb).
MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: str | Path, preprocess: dict[str, Any], dtype: str) -> np.ndarray:
    """An image file as the model's input, one row: decoded, converted, resized, scaled,
    normalized and laid out as ``preprocess`` says. Raises RequestError naming what is wrong."""
    Image = _pillow()
    height, width = preprocess["size"]
    channels = preprocess.get("channels", "RGB")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(
                    f"{image.width}x{image.height} pixels (limit {MAX_IMAGE_PIXELS})",
                    reason="image_too_large",
                )
            image.draft("L" if channels == "L" else "RGB", (width, height))  # JPEG: decode small
            converted = image.convert("L" if channels == "L" else "RGB")
            resized = converted.resize((width, height), Image.Resampling.BILINEAR)
            arr: np.ndarray = np.asarray(resized, dtype=np.float32)
    except RequestError:
        raise
    except Exception as e:  # Pillow raises a dozen types for bad bytes
        raise RequestError(f"not a readable image: {e}", reason="bad_image") from e
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
    if channels == "BGR":
        arr = arr[:, :, ::-1]
    arr = arr * np.float32(float(preprocess.get("scale", 1 / 255)))
    if preprocess.get("mean"):
        arr = arr - np.asarray(preprocess["mean"], np.float32)
    if preprocess.get("std"):
        arr = arr / np.asarray(preprocess["std"], np.float32)
    if preprocess.get("layout", "NCHW") == "NCHW":
        arr = arr.transpose(2, 0, 1)
    want = np.dtype(dtype)
    if want.kind in "iu":
        arr = np.clip(np.rint(arr), np.iinfo(want).min, np.iinfo(want).max)
    return np.ascontiguousarray(arr[np.newaxis], dtype=want)


def load_file(path: str | Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """An input file's arrays by input name. Raises RequestError naming what is wrong."""
    try:
        with open(path, "rb") as f:
            # Read at most one byte past the limit (a file growing meanwhile included): asking
            # for the limit itself would allocate a 256 MiB buffer for every small file.
            size = min(os.fstat(f.fileno()).st_size, MAX_FILE_BYTES)
            data = f.read(size + 1)
        if len(data) > MAX_FILE_BYTES:
            raise RequestError(f"over {MAX_FILE_BYTES} bytes", reason="file_too_large")
    except OSError as e:
        raise RequestError(f"cannot read: {e.strerror}", reason="unreadable") from e
    if str(path).lower().endswith(".npy"):
        if len(input_names) != 1:
            raise RequestError(
                f"a .npy file holds one array; the model has inputs {list(input_names)} "
                "(use .npz with one array per input)",
                reason="input_count",
            )
        return {input_names[0]: codec.decode_npy(data)}
    arrays = codec.decode_npz(data)
    missing = [n for n in input_names if n not in arrays]
    extra = [n for n in arrays if n not in input_names]
    if missing or extra:
        raise RequestError(
            f"arrays {sorted(arrays)} do not match the model's inputs {list(input_names)}",
            reason="input_names",
        )
    return arrays


@dataclass
class _Sample:
    """One input file, loaded: its arrays with a batch axis (``rows`` of them), or as sent."""

    file: str
    feeds: dict[str, np.ndarray]
    rows: int


@dataclass
class _Rows:
    """Scored rows waiting to be written as a part."""

    files: list[str] = field(default_factory=list)
    row: list[int] = field(default_factory=list)
    version: list[str] = field(default_factory=list)
    #: per output, arrays of rows (one per request), concatenated when written
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: chunks[0].shape[1:] for n, chunks in self.outputs.items()}

    def add(self, answer: _Scored) -> None:
        """One request's answer: its outputs' rows, in the order of its files' rows."""
        for file, rows in zip(answer.files, answer.rows, strict=True):
            self.files += [file] * rows
            self.row += range(rows)
        self.version += [answer.version] * sum(answer.rows)
        for name, arr in answer.outputs.items():
            self.outputs.setdefault(name, []).append(arr)


class Scorer:
    """Scores files through an agent's local API; see the module's docstring.

    Files are read and sent by ``workers`` processes of their own, a chunk of ``batch_size``
    files at a time, each on its own connection to the agent: reading and decoding files
    is Python work, and in one process it would hold the interpreter lock against the
    requests (the agent waited on the reader). This process keeps the results in the files'
    order, writes the parts and the output, and reports progress."""

    def __init__(
        self,
        client: AgentClient,
        model: str,
        out: Path,
        *,
        batch_size: int = 64,
        workers: int | None = None,
        progress: Callable[[ScoreResult, int, bool], None] | None = None,
    ) -> None:
        if out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ConfigError(f"--out {out}: write .npz or .parquet, not {out.suffix or 'none'!r}")
        if out.suffix.lower() == ".parquet":
            _pyarrow()  # refuse now, not after an hour of scoring
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be at least 1, not {workers}")
        self.client = client
        self.model = model
        self.out = out
        self.parts = out.with_name(out.name + ".partial")
        self.batch_size = batch_size
        self.workers = workers if workers is not None else default_workers()
        self._progress = progress
        self._pending = _Rows()
        self._last_part = time.monotonic()
        self._model_name = model

    # --- what is done already ---------------------------------------------------------------
    def done_files(self) -> set[str]:
        done: set[str] = set()
        if self.out.exists():
            done |= set(_read(self.out)["file"].tolist())
        for part in sorted(self.parts.glob("part-*.npz")) if self.parts.is_dir() else []:
            try:
                with np.load(part, allow_pickle=False) as npz:
                    done |= set(npz["file"].tolist())
            except Exception:  # a part is renamed into place whole; anything else is not ours
                continue
        return done

    # --- the run ----------------------------------------------------------------------------
    def run(self, files: Sequence[Path]) -> ScoreResult:
        described = self.client.describe(self.model)
        self._model_name = str(described.get("model") or self.model)
        model = _Model.of(described)
        names = [str(p) for p in files]
        if model.preprocess is None:
            # all() stops at the first file that is not an image: in most runs, the first.
            if names and all(is_image(name) for name in names):
                raise ConfigError(
                    f"{len(names)} image file(s), and {self._model_name} "
                    f"{described.get('version')}'s bundle says nothing of how to preprocess "
                    "images: annotate the model (edgefleet models annotate) and roll it out, or "
                    "convert them to arrays (.npy)"
                )
        elif any(is_image(name) for name in names):
            _pillow()  # refuse now, not at the first image
        result = ScoreResult(total_files=len(files))
        done = self.done_files()
        todo = [name for name in names if name not in done] if done else names
        result.skipped = len(files) - len(todo)
        start = time.monotonic()
        size = _chunk_files(len(todo), max(1, self.batch_size), self.workers)
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        pool = _Workers(self, model, min(self.workers, len(chunks))) if chunks else None
        try:
            for answers in pool.map(chunks) if pool is not None else ():
                for answer in answers:
                    if isinstance(answer, FileFailure):
                        result.failures.append(answer)
                    else:
                        self._keep(answer, result)
                self._tick(result, len(todo))
            self._finish()
        finally:
            if pool is not None:
                pool.close()
            self._flush()
        result.seconds = time.monotonic() - start
        self._tick(result, len(todo), final=True)
        return result

    def _keep(self, answer: _Scored, result: ScoreResult) -> None:
        pending = self._pending
        outputs = answer.outputs
        # Every row of a part has the same shapes: an answer whose outputs differ starts one.
        if pending.outputs and pending.shapes() != {n: a.shape[1:] for n, a in outputs.items()}:
            self._flush()
            pending = self._pending
        pending.add(answer)
        rows = sum(answer.rows)
        result.scored_files += len(answer.files)
        result.rows += rows
        result.versions[answer.version] = result.versions.get(answer.version, 0) + rows
        if len(pending) >= PART_ROWS or time.monotonic() - self._last_part >= PART_EVERY_S:
            self._flush()

    def _flush(self) -> None:
        """Write the pending rows as the next part (whole or not at all)."""
        pending, self._pending = self._pending, _Rows()
        self._last_part = time.monotonic()
        if not len(pending):
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        number = 1 + max(
            (int(p.stem.split("-")[1]) for p in self.parts.glob("part-*.npz")), default=0
        )
        arrays = _arrays(pending, self._model_name)
        write_atomic(self.parts / f"part-{number:06d}.npz", codec.encode_npz(arrays))

    def _finish(self) -> None:
        """The output, replaced whole: what it held before, every part, and the rows not yet
        in a part (they go straight into the output: writing them as a part only to read
        them back would cost a short run as much again)."""
        sources: list[dict[str, np.ndarray]] = []
        if self.out.exists():
            sources.append(_read(self.out))
        if self.parts.is_dir():
            for part in sorted(self.parts.glob("part-*.npz")):
                with np.load(part, allow_pickle=False) as npz:
                    sources.append({k: npz[k] for k in npz.files})
        pending, self._pending = self._pending, _Rows()
        if len(pending):
            sources.append(_arrays(pending, self._model_name))
        if not sources:
            return
        try:
            merged = _merge(sources)
            if self.out.suffix.lower() == ".parquet":
                data = _parquet_bytes(merged)
            else:
                data = codec.encode_npz(merged)
            write_atomic(self.out, data)
        except BaseException:
            self._pending = pending  # written as a part on the way out: nothing is lost
            raise
        shutil.rmtree(self.parts, ignore_errors=True)

    def _tick(self, result: ScoreResult, todo: int, *, final: bool = False) -> None:
        """Tell the progress callback: the figures so far, files this run scores, the end."""
        if self._progress is not None:
            self._progress(result, todo, final)


def default_workers() -> int:
    """Two reading processes where the CPUs allow (one where there is only one): with this
    process and the agent's, that keeps the agent's model busy on a small board without
    crowding out the model's own threads."""
    from edge_agent.runtimes.base import usable_cpus

    return min(2, usable_cpus())


@dataclass
class _Scored:
    """One request's answer as a worker hands it over: the files whose rows it holds, in
    order, with their numbers of rows; the version that answered; the outputs."""

    files: list[str]
    rows: list[int]
    version: str
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class _Fault:
    """Why a worker stopped (an exception does not always survive the trip between processes):
    the run stops and raises it again."""

    kind: str
    message: str
    status: int = 0
    reason: str = ""

    @classmethod
    def of(cls, e: BaseException) -> _Fault:
        if isinstance(e, AgentError):
            return cls("agent", e.message, e.status, e.reason)
        if isinstance(e, TransportError):
            return cls("transport", str(e))
        if isinstance(e, ConfigError):
            return cls("config", str(e))
        return cls("other", f"{type(e).__name__}: {e}")

    def error(self) -> Exception:
        if self.kind == "agent":
            return AgentError(self.status, self.reason, self.message)
        if self.kind == "transport":
            return TransportError(self.message)
        if self.kind == "config":
            return ConfigError(self.message)
        return EdgefleetError(f"a scoring worker failed: {self.message}")


#: Chunks handed to each worker beyond the one whose results are awaited: enough that no
#: worker waits for work, few enough that the results wait in memory only briefly (and a
#: swap or an interruption finds little scored ahead of what is written).
AHEAD = 2
#: Most batches of files in one chunk a worker takes. Each chunk costs a message each way
#: and a wake-up of this process and the worker's: 100,000 small files in chunks of one
#: batch spent 10-16 % more CPU in all than in chunks of four, on a 2-core machine.
CHUNK_BATCHES = 4
#: Fewest chunks a worker gets in a run: a short run stays fine-grained (its progress, what
#: an interruption keeps, a swap seen mid-run); only a long one takes bigger chunks.
MIN_CHUNKS_PER_WORKER = 16


def _chunk_files(files: int, batch_size: int, workers: int) -> int:
    """Files in one chunk: whole batches, from one up to ``CHUNK_BATCHES`` as the run allows."""
    batches = files // (batch_size * max(1, workers) * MIN_CHUNKS_PER_WORKER)
    return batch_size * max(1, min(CHUNK_BATCHES, batches))


def _context() -> Any:
    """How workers start. Forked, when this process runs no other thread (``edge-agent
    score``): fast, and nothing to import again. Otherwise from a fork server (a clean
    process): a fork copies every lock as it is, and one that another thread held (an
    agent's own, when the scorer runs beside it in one process) would never be released in
    the worker. Like any fork-server or spawned child, such a worker imports the caller's
    ``__main__``: a script that scores this way guards its work with ``if __name__ ==
    "__main__":``."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if sys.platform == "linux" and threading.active_count() == 1 and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["edge_agent.scoring"])
        return ctx
    return multiprocessing.get_context("spawn")


class _Workers:
    """The worker processes, and the chunks of files handed to them, results in order.

    Chunks go out on one queue (whichever worker is free takes the next); each worker sends
    its answers back on a pipe of its own, from its own thread (a queue's sending thread
    would contend with the worker's reading for its interpreter lock)."""

    def __init__(self, scorer: Scorer, model: _Model, count: int) -> None:
        ctx = _context()
        self.tasks = ctx.Queue()
        # Unread tasks are dropped when the run stops (not flushed into a pipe nobody reads).
        self.tasks.cancel_join_thread()
        self.procs: list[Any] = []
        self.readers: list[Connection] = []
        try:
            for i in range(count):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_work,
                    args=(
                        scorer.client.base_url,
                        scorer.client.timeout_s,
                        scorer.model,
                        model,
                        scorer.batch_size,
                        self.tasks,
                        writer,
                    ),
                    name=f"edge-agent-score-{i}",
                    daemon=True,
                )
                proc.start()
                writer.close()  # the worker's end
                self.procs.append(proc)
                self.readers.append(reader)
        except BaseException:
            self.close()
            raise

    def map(self, chunks: list[list[str]]) -> Iterator[list[_Scored | FileFailure]]:
        """Each chunk's answers, in the chunks' order. A chunk is handed out only once the
        caller has taken the answers of the chunk ``AHEAD`` per worker before it."""
        window = AHEAD * len(self.procs)
        sent = 0
        ready: dict[int, list[_Scored | FileFailure]] = {}
        for index in range(len(chunks)):
            while sent < min(len(chunks), index + window):
                self.tasks.put((sent, chunks[sent]))
                sent += 1
            while index not in ready:
                for number, answer in self._next():
                    if isinstance(answer, _Fault):
                        raise answer.error()
                    ready[number] = answer
            yield ready.pop(index)

    def _next(self) -> list[tuple[int, list[_Scored | FileFailure] | _Fault]]:
        """The answers that have come in (waiting for one); a worker that died is an error."""
        from multiprocessing.connection import wait

        sentinels = [p.sentinel for p in self.procs]
        while True:
            woken = wait([*self.readers, *sentinels], timeout=60.0)
            got: list[tuple[int, list[_Scored | FileFailure] | _Fault]] = []
            for reader in self.readers:
                if reader in woken:
                    with contextlib.suppress(EOFError):  # its worker is gone: below
                        got.append(reader.recv())
            if any(isinstance(answer, _Fault) for _, answer in got):
                return got  # the worker's own account of why it stopped
            # Workers end only when the run does: one that has ended took its chunk with it
            # (or the lock of the queue the others take their chunks from).
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                raise EdgefleetError(
                    f"scoring worker {dead[0].name} died (exit code {dead[0].exitcode})"
                )
            if got:
                return got

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)
        for reader in self.readers:
            reader.close()
        self.tasks.close()


def _work(
    url: str,
    timeout_s: float,
    model_name: str,
    model: _Model,
    batch_size: int,
    tasks: Any,
    answers: Any,
) -> None:
    """A worker: read each chunk's files, score them through the agent, send the answers
    back. It stops at the first fault (the run stops), when the run is over, or when the
    process that started it is gone (killed: nobody would take its answers or end it)."""
    import multiprocessing
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is the parent's to handle
    parent = multiprocessing.parent_process()
    client = AgentClient(url, timeout_s=timeout_s)
    try:
        while True:
            try:
                task = tasks.get(timeout=PARENT_CHECK_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if task is None:
                return
            number, paths = task
            try:
                scored: list[_Scored | FileFailure] | _Fault = _score_chunk(
                    client, model_name, model, paths, batch_size
                )
            except BaseException as e:
                scored = _Fault.of(e)
            answers.send((number, scored))
            if isinstance(scored, _Fault):
                return
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return  # the parent is gone


#: How often an idle worker checks that the process that started it is still there.
PARENT_CHECK_S = 1.0


def _score_chunk(
    client: AgentClient, model_name: str, model: _Model, paths: list[str], batch_size: int
) -> list[_Scored | FileFailure]:
    """A chunk's files: read, grouped into requests of up to ``batch_size`` rows (when the
    model has a batch axis), scored."""
    answers: list[_Scored | FileFailure] = []
    group: list[_Sample] = []
    rows = 0
    for path in paths:
        try:
            sample = _sample(path, model)
        except RequestError as e:
            answers.append(FileFailure(path, e.reason, e.message))
            continue
        if not model.batchable:
            _score(client, model_name, [sample], answers, batchable=False)
            continue
        if group and not _fits(group, rows, sample, batch_size):
            _score(client, model_name, group, answers, batchable=True)
            group, rows = [], 0
        group.append(sample)
        rows += sample.rows
        if rows >= batch_size:
            _score(client, model_name, group, answers, batchable=True)
            group, rows = [], 0
    if group:
        _score(client, model_name, group, answers, batchable=True)
    return answers


def _score(
    client: AgentClient,
    model_name: str,
    group: list[_Sample],
    answers: list[_Scored | FileFailure],
    *,
    batchable: bool,
) -> None:
    answer = _ask(client, model_name, group, batchable)
    if isinstance(answer, FileFailure):
        if len(group) > 1:  # one file spoiled the batch: find it, score the rest
            for sample in group:
                _score(client, model_name, [sample], answers, batchable=batchable)
        else:
            answers.append(answer)
        return
    version, outputs = answer
    if not batchable:  # the whole answer is the file's one row
        outputs = {n: a[np.newaxis] for n, a in outputs.items()}
    answers.append(_Scored([s.file for s in group], [s.rows for s in group], version, outputs))


def _ask(
    client: AgentClient, model_name: str, group: list[_Sample], batchable: bool
) -> tuple[str, dict[str, np.ndarray]] | FileFailure:
    """The agent's answer to ``group`` (its version and outputs), or why it has none (as the
    failure of the group's first file)."""
    try:
        if (
            batchable
            and len(group) > 1
            and len(group[0].feeds) == 1
            and next(iter(group[0].feeds.values())).nbytes >= SCATTER_BYTES
        ):
            # Large arrays go out as they are, not copied into one first.
            [name] = group[0].feeds
            parts = [s.feeds[name] for s in group]
            outputs = client.predict_rows(model_name, name, parts, workload="batch")
        elif batchable and len(group) > 1:
            feeds = {n: np.concatenate([s.feeds[n] for s in group]) for n in group[0].feeds}
            outputs = client.predict(model_name, feeds, workload="batch")
        else:
            outputs = client.predict(model_name, group[0].feeds, workload="batch")
    except AgentError as e:
        if e.status == 404:
            raise  # the model is not served (any more): nothing else would score either
        return FileFailure(group[0].file, e.reason, e.message)
    except RequestError as e:
        return FileFailure(group[0].file, e.reason, e.message)
    if batchable:
        total = sum(s.rows for s in group)
        bad = [n for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != total]
        if bad:
            return FileFailure(
                group[0].file,
                "output_rows",
                f"outputs {bad} do not have one row per input row ({total})",
            )
    return client.last_version or "?", outputs


def _sample(path: str, model: _Model) -> _Sample:
    if is_image(path):
        pre = model.preprocess
        if pre is None:
            raise RequestError(
                "the bundle says nothing of how to preprocess images", reason="no_preprocess"
            )
        if model.names != [pre["input"]]:
            raise RequestError(
                f"an image fills input {pre['input']!r} alone; the model has inputs "
                f"{model.names} (use .npz with one array per input)",
                reason="input_count",
            )
        feeds = {pre["input"]: load_image(path, pre, model.dtypes[pre["input"]])}
    else:
        feeds = load_file(path, model.names)
    ranks = model.ranks
    if not model.batchable:
        return _Sample(path, feeds, 1)
    rows = -1
    for name, arr in feeds.items():
        if arr.ndim == ranks[name] - 1:  # one sample without its batch axis
            feeds[name] = arr = arr[np.newaxis]
        elif arr.ndim != ranks[name]:
            raise RequestError(
                f"input {name!r} has {arr.ndim} dimensions; the model takes {ranks[name]} "
                f"(rows) or {ranks[name] - 1} (one sample)",
                reason="input_shape",
            )
        if rows < 0:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            counts = sorted({a.shape[0] for a in feeds.values()})
            raise RequestError(
                f"inputs have different numbers of rows {counts}", reason="input_shape"
            )
    return _Sample(path, feeds, rows)


def _fits(group: list[_Sample], rows: int, sample: _Sample, batch_size: int) -> bool:
    """``sample`` can travel in one request with ``group`` (of ``rows`` rows): same trailing
    shapes and dtypes, and room."""
    if rows + sample.rows > batch_size:
        return False
    first = group[0].feeds
    for name, a in sample.feeds.items():  # a loop, not all(): this runs once per file
        b = first[name]
        if a.dtype != b.dtype or a.shape[1:] != b.shape[1:]:
            return False
    return True


def _arrays(rows: _Rows, model: str) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "file": np.array(rows.files, dtype=str),
        "row": np.array(rows.row, dtype=np.int64),
        "model": np.array([model] * len(rows), dtype=str),
        "version": np.array(rows.version, dtype=str),
    }
    for name, values in rows.outputs.items():
        arrays[f"output/{name}"] = np.concatenate(values)
    return arrays


def _merge(sources: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = list(sources[0])
    for s in sources[1:]:
        if set(s) != set(keys):
            raise ConfigError(
                f"scored parts have different outputs ({sorted(keys)} vs {sorted(s)}): "
                "was the output file written for another model?"
            )
    merged: dict[str, np.ndarray] = {}
    for key in keys:
        values = [s[key] for s in sources]
        shapes = {v.shape[1:] for v in values}
        if len(shapes) != 1:
            raise ConfigError(
                f"{key}: rows of different shapes {sorted(shapes)} cannot share one output; "
                "score files of each shape into an output of their own"
            )
        merged[key] = np.concatenate(values)
    return merged


def _read(path: Path) -> dict[str, np.ndarray]:
    """An earlier run's output, as arrays (``file`` at least)."""
    try:
        if path.suffix.lower() == ".parquet":
            return _from_parquet(path)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: exists and is not an output of edge-agent score ({e})") from e
    if "file" not in arrays:
        raise ConfigError(f"{path}: exists and is not an output of edge-agent score")
    return arrays


def _pyarrow() -> Any:
    try:
        import pyarrow as pa  # type: ignore[import-not-found,unused-ignore]
        import pyarrow.parquet  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise ConfigError(
            "writing .parquet needs pyarrow (pip install 'edgefleet[agent,parquet]'); or write .npz"
        ) from e
    return pa


def _parquet_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    pa = _pyarrow()
    import io

    import pyarrow.parquet as pq  # type: ignore[import-not-found,unused-ignore]

    columns: dict[str, Any] = {
        k: pa.array(arrays[k].tolist() if arrays[k].dtype.kind == "U" else arrays[k])
        for k in ("file", "row", "model", "version")
    }
    shapes: dict[str, Any] = {}
    for key, values in arrays.items():
        if not key.startswith("output/"):
            continue
        name = key[len("output/") :]
        n = len(values)
        width = int(np.prod(values.shape[1:], dtype=np.int64))
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, width) if n else flat
        shapes[name] = {"shape": list(values.shape[1:]), "dtype": values.dtype.name}
    table = pa.table(columns).replace_schema_metadata(
        {"edgefleet": json.dumps({"outputs": shapes})}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _from_parquet(path: Path) -> dict[str, np.ndarray]:
    _pyarrow()
    import pyarrow.parquet as pq  # type: ignore[import-not-found,unused-ignore]

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"edgefleet", b"{}"))
    arrays: dict[str, np.ndarray] = {
        "file": np.array(table.column("file").to_pylist(), dtype=str),
        "row": table.column("row").to_numpy(),
        "model": np.array(table.column("model").to_pylist(), dtype=str),
        "version": np.array(table.column("version").to_pylist(), dtype=str),
    }
    for name, info in meta.get("outputs", {}).items():
        column = table.column(name).combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        arrays[f"output/{name}"] = flat.astype(info["dtype"]).reshape(len(table), *info["shape"])
    return arrays


class Progress:
    """A progress line on stderr: files and rows done, rate, ETA. On a terminal it is
    redrawn in place a few times a second; in a log, a line every ``log_every_s``."""

    def __init__(self, stream: TextIO = sys.stderr, log_every_s: float = 10.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 0.2 if self.tty else log_every_s
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, result: ScoreResult, todo: int, final: bool) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every:
            return
        self.last = now
        done = result.scored_files + len(result.failures)
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (todo - done) / rate if rate > 0 else float("inf")
        width = 24
        filled = min(width, int(width * done / todo)) if todo else width
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{todo} files, "
            f"{result.rows} rows, {result.rows / elapsed:,.0f} rows/s, "
            f"{len(result.failures)} failed, ETA {_clock(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def agent_client(socket_path: Path | None, host: str, port: int) -> AgentClient:
    """The agent's Unix socket when it is there, else its TCP port."""
    if socket_path is not None and socket_path.exists():
        return AgentClient(f"unix://{socket_path}", timeout_s=300)
    return AgentClient(f"http://{host}:{port}", timeout_s=300)


def failures_report(out: Path, failures: list[FileFailure]) -> Path | None:
    """``OUT.failed.jsonl``: one line per file that was not scored (removed when none)."""
    path = out.with_name(out.name + ".failed.jsonl")
    if not failures:
        path.unlink(missing_ok=True)
        return None
    text = "".join(json.dumps(f.to_json()) + "\n" for f in failures)
    write_atomic(path, text.encode())
    return path


def iter_lines(failures: list[FileFailure], limit: int = 10) -> Iterator[str]:
    for f in failures[:limit]:
        yield f"  {f.file}: {f.reason}: {f.message}"
    if len(failures) > limit:
        yield f"  … and {len(failures) - limit} more"
