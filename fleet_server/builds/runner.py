"""The build job runner: claims queued builds from the database and runs each in its own
subprocess, on a small thread pool.

``python -m converters.job`` runs the conversion: the converter's crash, memory blow-up or hang
fails that job (with its output) and never the server. The job's stdout is streamed into the
build log as it runs. The server signs the result with its current online key, moves the
bundle into the artifact store and only then marks the build succeeded.

Several server processes share one database: a build is **claimed** (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, and a compare-and-set update on both dialects) with a lease the
claimant renews while it runs. Every write of a running build is conditional on the claim, so
a process that lost it (stalled past its lease) changes nothing. A build whose process died is
taken over by whichever process claims next once the lease has run out; one that has been
started ``MAX_ATTEMPTS`` times fails instead of taking every server down in turn.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from converters.build import Prepared, write_bundle
from firmware_profiles import ProfileCatalog
from fleet_server.artifacts import ArtifactStore
from fleet_server.builds.service import get_build
from fleet_server.builds.states import BuildState
from fleet_server.builds.tables import Build
from fleet_server.bundles.tables import Bundle
from fleet_server.errors import NotFoundError, UnavailableError
from fleet_server.keys.service import ServerKeys
from fleet_server.registry.service import version_by_id

log = logging.getLogger(__name__)

#: Lines of converter output kept in the error of a crashed build.
_TAIL = 30
#: Starts of one build (the first, and take-overs after its process died) before it fails.
MAX_ATTEMPTS = 3
_BUILDS = Build.__table__  # type: ignore[attr-defined]


class ClaimLost(Exception):
    """This process no longer holds the build (its lease ran out and another took it)."""


class BuildRunner:
    """Claims builds and runs them on a small thread pool, each in its own subprocess."""

    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        keys: ServerKeys,
        catalog: ProfileCatalog,
        *,
        workers: int = 1,
        timeout_s: float = 3600,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> None:
        self.engine, self.store, self.keys, self.catalog = engine, store, keys, catalog
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self._poll_s = poll_s
        self._workers = workers
        #: Who holds a claim: this process (the id is new at each start).
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgefleet-build")
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._postgres = engine.dialect.name == "postgresql"

    def start(self) -> None:
        """Claim builds as they are queued (and take over those whose process died)."""
        self._thread = threading.Thread(target=self._loop, name="edgefleet-builds", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for proc in self._procs.values():
                proc.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, build_id: str) -> None:
        """A build was queued: claim soon (this process, or any other that is free first)."""
        self._wake.set()

    # --- claiming --------------------------------------------------------------------------------

    def _loop(self) -> None:
        renewed = time.monotonic()
        while not self._stopping.is_set():
            try:
                if time.monotonic() - renewed > self.lease_s / 3:
                    self._renew()
                    renewed = time.monotonic()
                for build_id in self.claim():
                    self._pool.submit(self._execute, build_id)
            except Exception:  # the database may be away for a while: try again
                log.exception("build claim loop")
            self._wake.wait(self._poll_s)
            self._wake.clear()

    def claim(self) -> list[str]:
        """Claim as many claimable builds as this process has free workers; returns their ids."""
        with self._lock:
            free = self._workers - len(self._running)
        if free <= 0:
            return []
        now = datetime.now(UTC)
        claimable = or_(
            _BUILDS.c.state == BuildState.QUEUED,
            and_(_BUILDS.c.state == BuildState.RUNNING, _BUILDS.c.lease_until < now),
        )
        claimed: list[str] = []
        with Session(self.engine) as session:
            query = (
                sa_select(_BUILDS.c.id, _BUILDS.c.attempts)
                .where(claimable)
                .order_by(_BUILDS.c.created_at)
                .limit(free)
            )
            if self._postgres:
                query = query.with_for_update(skip_locked=True)
            for build_id, attempts in session.execute(query).all():
                if attempts >= MAX_ATTEMPTS:
                    self._give_up(session, build_id, claimable, attempts)
                    continue
                taken = session.execute(
                    update(_BUILDS)
                    .where(_BUILDS.c.id == build_id, claimable)
                    .values(
                        state=BuildState.RUNNING,
                        claimed_by=self.claimant,
                        lease_until=now + timedelta(seconds=self.lease_s),
                        started_at=now,
                        attempts=attempts + 1,
                        log=_BUILDS.c.log
                        + (f"taken over by {self.claimant} (attempt {attempts + 1})\n"
                           if attempts else ""),
                    )
                )  # fmt: skip
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(build_id)
            session.commit()
        with self._lock:
            self._running.update(claimed)
        return claimed

    def _give_up(self, session: Session, build_id: str, claimable: Any, attempts: int) -> None:
        message = (
            f"the build was started {attempts} times and its server process died each time; "
            "create it again"
        )
        session.execute(
            update(_BUILDS)
            .where(_BUILDS.c.id == build_id, claimable)
            .values(
                state=BuildState.FAILED,
                finished_at=datetime.now(UTC),
                error={"reason": "interrupted", "message": message, "detail": None},
                log=_BUILDS.c.log + f"failed: {message}\n",
            )
        )

    def _renew(self) -> None:
        with self._lock:
            mine = sorted(self._running)
        if not mine:
            return
        with Session(self.engine) as session:
            session.execute(
                update(_BUILDS)
                .where(_BUILDS.c.id.in_(mine), _BUILDS.c.claimed_by == self.claimant)
                .values(lease_until=datetime.now(UTC) + timedelta(seconds=self.lease_s))
            )
            session.commit()

    # --- one job ---------------------------------------------------------------------------------

    def _owned(self, session: Session, build_id: str, **fields: Any) -> None:
        """Write ``fields`` to the build if this process still holds it; else ClaimLost."""
        done = session.execute(
            update(_BUILDS)
            .where(
                _BUILDS.c.id == build_id,
                _BUILDS.c.claimed_by == self.claimant,
                _BUILDS.c.state == BuildState.RUNNING,
            )
            .values(**fields)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            raise ClaimLost(build_id)

    def _update(self, build_id: str, **fields: Any) -> None:
        with Session(self.engine) as session:
            self._owned(session, build_id, **fields)
            session.commit()

    def _append_log(self, build_id: str, lines: list[str]) -> None:
        self._update(build_id, log=_BUILDS.c.log + "".join(lines))

    def _fail(self, build_id: str, reason: str, message: str, **detail: Any) -> None:
        self._update(
            build_id,
            log=_BUILDS.c.log + f"failed: {message}\n",
            state=BuildState.FAILED,
            finished_at=datetime.now(UTC),
            error={"reason": reason, "message": message, "detail": detail or None},
        )

    def _execute(self, build_id: str) -> None:
        try:
            self._run(build_id)
        except ClaimLost:
            log.warning("build %s: this process lost its claim; its result is dropped", build_id)
        except UnavailableError as e:  # the artifact store (S3) failed: nothing was published
            log.warning("build %s failed: %s", build_id, e.message)
            with contextlib.suppress(ClaimLost):
                self._fail(build_id, "artifact_store", e.message)
        except Exception as e:  # a bug here must fail the job, not leave it "running"
            log.exception("build %s failed unexpectedly", build_id)
            with contextlib.suppress(ClaimLost):
                self._fail(build_id, "internal_error", f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._running.discard(build_id)
            self._wake.set()  # a worker is free

    def _run(self, build_id: str) -> None:
        if self._stopping.is_set():
            return
        with Session(self.engine) as session:
            build = get_build(session, build_id)
            if build.state != BuildState.RUNNING or build.claimed_by != self.claimant:
                return
            model, version = version_by_id(session, build.model_version_id)
            profile = self.catalog.get(build.profile)
            options = dict(build.options)
            blobs = {
                "source": (version.source_sha256, "source.onnx"),
                "calibration": (version.calibration_sha256, "calibration.npz"),
                "validation": (version.validation_sha256, "validation.npz"),
            }
            spec_version = {
                "source_sha256": version.source_sha256,
                "name": model.name,
                "version": version.version,
                "inputs": version.inputs,
                "outputs": [{k: v for k, v in o.items() if k != "kind"} for o in version.outputs],
                "output_kinds": {o["name"]: o["kind"] for o in version.outputs if "kind" in o},
            }
        work = self.store.scratch_dir()
        try:
            try:  # the store's own files, or copies in the work directory (S3)
                files = {
                    what: str(self.store.materialize(sha, work / name)) if sha else None
                    for what, (sha, name) in blobs.items()
                }
            except NotFoundError as e:
                self._fail(build_id, "artifact_store", e.message)
                return
            spec = {
                **spec_version,
                **files,
                "work": str(work),
                "profile": profile.to_dict(),
                "thresholds": options.get("thresholds") or {},
                "runtimes": options.get("runtimes"),
                "precisions": options.get("precisions"),
                "fp32_inputs": options.get("fp32_inputs"),
            }
            (work / "spec.json").write_text(json.dumps(spec))
            outcome, tail, code = self._subprocess(build_id, work)
            if outcome is None and self._stopping.is_set():
                # Stopped by this server's shutdown, not by the converter: queued again for
                # whichever server claims next.
                self._update(
                    build_id,
                    state=BuildState.QUEUED,
                    claimed_by=None,
                    lease_until=None,
                    attempts=_BUILDS.c.attempts - 1,
                    log=_BUILDS.c.log + "stopped with its server; queued again\n",
                )
                return
            if outcome is None:
                self._fail(
                    build_id,
                    "converter_crashed",
                    f"the build process exited with status {code} without a result; its last "
                    "output:\n" + "\n".join(tail),
                    exit_code=code,
                )
                return
            peak = outcome.get("peak_rss_mb")
            if not outcome["ok"]:
                error = outcome["error"]
                detail = dict(error.get("detail") or {})
                candidates = detail.pop("candidates", [])
                self._update(
                    build_id,
                    state=BuildState.FAILED,
                    finished_at=datetime.now(UTC),
                    error={
                        "reason": error["reason"],
                        "message": error["message"],
                        "detail": detail,
                    },
                    candidates=candidates,
                    peak_rss_mb=peak,
                )
                return
            prepared = Prepared.from_json(outcome["prepared"])
            self._publish(build_id, prepared, work, peak)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _subprocess(
        self, build_id: str, work: Path
    ) -> tuple[dict[str, Any] | None, list[str], int | None]:
        cmd = [sys.executable, "-m", "converters.job", str(work / "spec.json")]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        with self._lock:
            self._procs[build_id] = proc
        timer = threading.Timer(self.timeout_s, proc.kill)
        timer.start()
        tail: list[str] = []
        try:
            assert proc.stdout is not None
            pending: list[str] = []
            last_flush = time.monotonic()
            for line in proc.stdout:
                pending.append(line)
                tail = [*tail, line.rstrip()][-_TAIL:]
                if time.monotonic() - last_flush > 0.3:
                    self._append_log(build_id, pending)
                    pending, last_flush = [], time.monotonic()
            if pending:
                self._append_log(build_id, pending)
            code = proc.wait()
        except BaseException:
            proc.kill()  # the claim was lost, or the server stops: the job goes too
            proc.wait()
            raise
        finally:
            timer.cancel()
            with self._lock:
                self._procs.pop(build_id, None)
        result = work / "result.json"
        if code not in (0, 1) or not result.is_file():
            if not timer.is_alive() and code == -9 and not self._stopping.is_set():
                tail.append(f"(killed after the build timeout of {self.timeout_s:.0f} s)")
            return None, tail, code
        outcome: dict[str, Any] = json.loads(result.read_text())
        return outcome, tail, code

    def _publish(self, build_id: str, prepared: Prepared, work: Path, peak: float | None) -> None:
        with Session(self.engine) as session:
            build = get_build(session, build_id)
            signer = self.keys.signer(session)
            result = write_bundle(
                prepared, work / "bundle.efb", signer=signer.sign, signing_key_id=signer.keyid
            )
            sha256, size = self.store.put_file(result.path)
            if session.get(Bundle, sha256) is None:
                session.add(
                    Bundle(
                        sha256=sha256,
                        model_version_id=build.model_version_id,
                        profile=build.profile,
                        cache_key=build.cache_key,
                        runtime=result.target.runtime,
                        precision=result.target.precision,
                        signing_key_id=signer.keyid,
                        size=size,
                        manifest=result.manifest.to_dict(),
                        passed_over=result.passed_over,
                        created_at=datetime.now(UTC),
                    )
                )
                session.flush()
            # The bundle and the build's success in one transaction, if the claim still holds.
            self._owned(
                session,
                build_id,
                state=BuildState.SUCCEEDED,
                finished_at=datetime.now(UTC),
                bundle_sha256=sha256,
                runtime=result.target.runtime,
                precision=result.target.precision,
                candidates=prepared.candidates,
                peak_rss_mb=peak,
                log=_BUILDS.c.log + f"signed by {signer.keyid[:12]}…, bundle {sha256[:12]}…\n",
            )
            session.commit()
