"""The build job runner: a small thread pool, each job in its own subprocess.

``python -m converters.job`` runs the conversion: the converter's crash, memory blow-up or hang
fails that job (with its output) and never the server. The job's stdout is streamed into the
build log as it runs. The server signs the result with its current online key, moves the
bundle into the artifact store and only then marks the build succeeded.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from converters.build import Prepared, write_bundle
from firmware_profiles import ProfileCatalog
from fleet_server.artifacts import ArtifactStore
from fleet_server.builds.service import get_build
from fleet_server.builds.tables import Build, BuildState
from fleet_server.bundles.tables import Bundle
from fleet_server.keys.service import ServerKeys
from fleet_server.registry.service import version_by_id

log = logging.getLogger(__name__)

#: Lines of converter output kept in the error of a crashed build.
_TAIL = 30


class BuildRunner:
    """Runs build jobs on a small thread pool, each in its own subprocess."""

    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        keys: ServerKeys,
        catalog: ProfileCatalog,
        *,
        workers: int = 1,
        timeout_s: float = 3600,
    ) -> None:
        self.engine, self.store, self.keys, self.catalog = engine, store, keys, catalog
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgefleet-build")
        self._procs: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Recover after a restart: a build that was running is failed (its subprocess died
        with the old server); queued ones run."""
        with Session(self.engine) as session:
            for build in session.exec(select(Build).where(Build.state == BuildState.RUNNING)).all():
                build.state, build.finished_at = BuildState.FAILED, datetime.now(UTC)
                build.error = {
                    "reason": "interrupted",
                    "message": "the server stopped while this build ran; create it again",
                }
                session.add(build)
            queued = [
                b.id for b in session.exec(select(Build).where(Build.state == BuildState.QUEUED))
            ]
            session.commit()
        for build_id in queued:
            self.submit(build_id)

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            for proc in self._procs:
                proc.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, build_id: str) -> None:
        self._pool.submit(self._execute, build_id)

    # --- one job ---------------------------------------------------------------------------------

    def _update(self, build_id: str, **fields: Any) -> None:
        with Session(self.engine) as session:
            build = get_build(session, build_id)
            for k, v in fields.items():
                setattr(build, k, v)
            session.add(build)
            session.commit()

    def _append_log(self, build_id: str, lines: list[str]) -> None:
        with Session(self.engine) as session:
            build = get_build(session, build_id)
            build.log = build.log + "".join(lines)
            session.add(build)
            session.commit()

    def _fail(self, build_id: str, reason: str, message: str, **detail: Any) -> None:
        self._append_log(build_id, [f"failed: {message}\n"])
        self._update(
            build_id,
            state=BuildState.FAILED,
            finished_at=datetime.now(UTC),
            error={"reason": reason, "message": message, "detail": detail or None},
        )

    def _execute(self, build_id: str) -> None:
        try:
            self._run(build_id)
        except Exception as e:  # a bug here must fail the job, not leave it "running"
            log.exception("build %s failed unexpectedly", build_id)
            self._fail(build_id, "internal_error", f"{type(e).__name__}: {e}")

    def _run(self, build_id: str) -> None:
        if self._stopping:
            return
        with Session(self.engine) as session:
            build = get_build(session, build_id)
            if build.state != BuildState.QUEUED:
                return
            model, version = version_by_id(session, build.model_version_id)
            profile = self.catalog.get(build.profile)
            options = dict(build.options)
            spec_version = {
                "source": str(self.store.path(version.source_sha256)),
                "source_sha256": version.source_sha256,
                "name": model.name,
                "version": version.version,
                "inputs": version.inputs,
                "outputs": [{k: v for k, v in o.items() if k != "kind"} for o in version.outputs],
                "output_kinds": {o["name"]: o["kind"] for o in version.outputs if "kind" in o},
                "calibration": str(self.store.path(version.calibration_sha256))
                if version.calibration_sha256
                else None,
                "validation": str(self.store.path(version.validation_sha256))
                if version.validation_sha256
                else None,
            }
            build.state, build.started_at = BuildState.RUNNING, datetime.now(UTC)
            session.add(build)
            session.commit()
        work = self.store.scratch_dir()
        try:
            spec = {
                **spec_version,
                "work": str(work),
                "profile": profile.model_dump(mode="json"),
                "thresholds": options.get("thresholds") or {},
                "runtimes": options.get("runtimes"),
                "precisions": options.get("precisions"),
                "fp32_inputs": options.get("fp32_inputs"),
            }
            (work / "spec.json").write_text(json.dumps(spec))
            outcome, tail, code = self._subprocess(build_id, work)
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
            self._procs.add(proc)
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
        finally:
            timer.cancel()
            with self._lock:
                self._procs.discard(proc)
        result = work / "result.json"
        if code not in (0, 1) or not result.is_file():
            if not timer.is_alive() and code == -9 and not self._stopping:
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
                        manifest=result.manifest.model_dump(mode="json"),
                        passed_over=result.passed_over,
                        created_at=datetime.now(UTC),
                    )
                )
            build.state = BuildState.SUCCEEDED
            build.finished_at = datetime.now(UTC)
            build.bundle_sha256 = sha256
            build.runtime, build.precision = result.target.runtime, result.target.precision
            build.candidates = prepared.candidates
            build.peak_rss_mb = peak
            build.log = build.log + f"signed by {signer.keyid[:12]}…, bundle {sha256[:12]}…\n"
            session.add(build)
            session.commit()
