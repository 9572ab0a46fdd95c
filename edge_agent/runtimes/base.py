"""The runtime seam: the interfaces every backend implements, and input checking shared by all.

    Runtime.load(path, options) -> LoadedModel      (a backend implements ``_load``)
    LoadedModel.run(feeds) -> outputs               (a backend implements ``_run``)
    LoadedModel.close()                             (a backend implements ``_close``)

The public methods are the seam's one wrapper (as python-tuf's fetcher is): whatever a backend
or its library raises comes out as the project's own error — the project's errors as they are,
anything else as :class:`RuntimeBackendError` (``load_failed`` / ``inference_failed``), chained
from the original. So every failure on live traffic is counted, answered with a JSON error,
and seen by probation; a self-test or probe fails with a reason instead of crashing a step.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import EdgefleetError, RequestError, RuntimeBackendError


def _normalized(name: str) -> str:
    """A distribution name as the packaging specifications compare them. Not
    ``packaging.utils.canonicalize_name``: importing it loads ``packaging.tags``,
    ``sysconfig`` and ``subprocess`` into the agent, which needs none of them otherwise."""
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_version(module: str, *distributions: str) -> str | None:
    """The version of the first of ``distributions`` installed on ``sys.path``, when the
    library they install (``module``) can be imported, without importing it: from its
    ``{name}-{version}.dist-info`` directory's name, as the packaging specifications name it.
    ``importlib.metadata`` reads the same directory, but importing it and parsing the metadata
    keep ~0.9 MiB resident in the agent for good; it is asked only where the library is there
    and no such directory is found (an egg or a zip on the path, say)."""
    if importlib.util.find_spec(module) is None:
        return None
    wanted = {_normalized(d): i for i, d in enumerate(distributions)}
    found: dict[int, str] = {}
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as names:
                for item in names:
                    if not item.name.endswith(".dist-info"):
                        continue
                    name, _, number = item.name.removesuffix(".dist-info").partition("-")
                    rank = wanted.get(_normalized(name))
                    if rank is not None and number:
                        found.setdefault(rank, number)
        except OSError:  # not a directory (a zip), gone
            continue
        if found:
            return found[min(found)]
    from importlib.metadata import PackageNotFoundError, version

    for dist in distributions:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


@dataclass(frozen=True)
class LoadOptions:
    #: Intra-op threads; 0 lets the runtime decide.
    threads: int = 0
    #: Let onnxruntime's worker threads spin between runs (its default) instead of sleeping
    #: (LiteRT's pool manages its own waiting and ignores this): back-to-back batches start a
    #: little sooner, but every worker keeps a core busy after each run. Off: a device
    #: answering requests now and then, its app and its temperature need those cores
    #: (bench/runtime_threads.py, a small CNN at 25 requests/s on 2 cores: 29-36 ms of CPU a
    #: request spinning, 1.1-1.4 ms not, for a median latency 0.1-0.2 ms higher). Nor does
    #: batch scoring gain: ``edge-agent score``'s reading processes need those cores too
    #: (bench/batch_scoring.py, the CNN: 0.78-0.81x the raw runtime spinning, 0.89-1.03x not).
    spin: bool = False
    #: onnxruntime execution providers in order of preference; unavailable ones are skipped.
    providers: tuple[str, ...] = field(default_factory=tuple)
    #: Where a backend may keep compiled forms of a model (TensorRT engines, timing caches).
    cache_dir: Path | None = None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a container's CPU set, an ``isolcpus``
    board), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def runtime_threads(configured: int, profile: int) -> int:
    """Intra-op threads: the configured figure as it is; else the profile's, capped at the CPUs
    this process may use. A profile names the board's cores; a worker per core the process
    cannot run on only waits its turn (and, spinning, takes a core's time from the others)."""
    return configured if configured > 0 else min(profile, usable_cpus())


def _foreign(e: Exception, what: str, reason: str) -> RuntimeBackendError:
    return RuntimeBackendError(
        f"{what}: {type(e).__name__}: {e}", reason=reason, error_type=type(e).__name__
    )


class LoadedModel(ABC):
    """A model loaded in a runtime, ready to run. ``run`` is safe to call from many threads."""

    #: The runtime that loaded it, for error messages.
    runtime_name: str = "runtime"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name. Raises ``RequestError`` for feeds that do not fit the model and
        ``RuntimeBackendError`` for anything else that goes wrong."""
        try:
            return self._run(feeds)
        except EdgefleetError:
            raise
        except Exception as e:
            raise _foreign(e, f"{self.runtime_name} inference failed", "inference_failed") from e

    def close(self) -> None:
        try:
            self._close()
        except EdgefleetError:
            raise
        except Exception as e:
            raise _foreign(e, f"{self.runtime_name} could not close a model", "close_failed") from e

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _close(self) -> None: ...


class Runtime(ABC):
    name: str

    def version(self) -> str | None:
        """Installed version, or None when the library is not installed. onnxruntime and
        LiteRT read it from their package's metadata without importing the library (an
        agent holds only the runtime it serves with), so a broken install is found when a
        model is loaded, not here."""
        try:
            return self._version()
        except Exception:
            return None

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        try:
            model = self._load(path, options)
        except EdgefleetError:
            raise
        except Exception as e:
            raise _foreign(e, f"{self.name} could not load {path.name}", "load_failed") from e
        model.runtime_name = self.name
        return model

    @abstractmethod
    def _version(self) -> str | None: ...

    @abstractmethod
    def _load(self, path: Path, options: LoadOptions) -> LoadedModel: ...


_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype(name: str) -> np.dtype[Any]:
    found = _DTYPES.get(name)
    if found is None:
        found = _DTYPES[name] = np.dtype(name)
    return found


def _ready(spec: TensorSpec, arr: object) -> bool:
    """Already what the model takes: a C-contiguous array of its dtype, rank and fixed dims."""
    if type(arr) is not np.ndarray or arr.dtype != _dtype(spec.dtype):
        return False
    if arr.ndim != len(spec.shape) or not arr.flags.c_contiguous:
        return False
    return all(w == g or type(w) is not int for w, g in zip(spec.shape, arr.shape, strict=True))


def check_feeds(specs: list[TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match ``feeds`` to the model's inputs: names exact, rank and fixed dims equal, dtype cast
    only when lossless (lists decoded from JSON arrive as float64/int64)."""
    # The serving hot path: feeds that are already right go through untouched (a few µs; the
    # general path below costs tens of µs per request on a small board).
    if len(feeds) == len(specs) and all(_ready(s, feeds.get(s.name)) for s in specs):
        return {s.name: feeds[s.name] for s in specs}
    expected = {s.name for s in specs}
    got = set(feeds)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise RequestError(
            "inputs do not match the model"
            + (f"; missing: {missing}" if missing else "")
            + (f"; unexpected: {extra}" if extra else ""),
            reason="input_names",
        )
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = np.asarray(feeds[spec.name])
        want = np.dtype(spec.dtype)
        if arr.dtype != want:
            if not _safe_cast(arr, want):
                raise RequestError(
                    f"input {spec.name!r}: dtype {arr.dtype} cannot be converted to {want}",
                    reason="input_dtype",
                )
            arr = arr.astype(want)
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(spec.shape, arr.shape, strict=True)
        ):
            raise RequestError(
                f"input {spec.name!r}: shape {list(arr.shape)} does not fit {spec.shape}",
                reason="input_shape",
            )
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def _safe_cast(arr: np.ndarray, want: np.dtype[np.generic]) -> bool:
    if np.can_cast(arr.dtype, want, casting="safe"):
        return True
    # JSON numbers decode as float64/int64; narrowing to the model's float type is expected.
    if arr.dtype.kind in "fiu" and want.kind == "f":
        return True
    if arr.dtype.kind in "iu" and want.kind in "iu":
        info = np.iinfo(want)  # type: ignore[type-var]  # want.kind is "i" or "u" here
        return arr.size == 0 or (int(arr.min()) >= info.min and int(arr.max()) <= info.max)
    return False
