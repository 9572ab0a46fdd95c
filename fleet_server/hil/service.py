"""Registering rigs, and the life of a HIL job.

A rollout created with ``hil`` gets one job (:func:`create_job`, in the rollout's transaction).
A runner on the machine wired to the bench claims its rig's oldest open job
(:func:`claim`): it gets the job and a lease token, and the job is ``running``. Only the holder
of that token may post the verdict (:func:`post_verdict`: passed or failed, with ``junit.xml``
and ``report.html``, stored in the artifact store); anything else is refused and changes
nothing. A job with no verdict by its deadline is ``timed_out`` (:func:`expire`, called by the
rollout engine): a runner that is gone or silent fails the stage, it never passes it. One rig
runs one job at a time: a running job holds the rig until its verdict or its deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from pydantic import Field
from sqlmodel import Session, col, select

from fleet_server.api.schemas import RequestBody
from fleet_server.artifacts import ArtifactStore
from fleet_server.audit.service import record
from fleet_server.database import aware
from fleet_server.errors import ConflictError, InvalidInputError, NotFoundError
from fleet_server.hil.tables import (
    OPEN_STATES,
    HilJob,
    HilJobPublic,
    HilJobState,
    HilRig,
    HilRigPublic,
)

__all__ = [
    "ClaimBody",
    "RigDeviceBody",
    "RigRegister",
    "cancel",
    "claim",
    "create_job",
    "expire",
    "get_job",
    "get_rig",
    "job_for_rollout",
    "list_rigs",
    "post_verdict",
    "register_rig",
]

#: Largest report a runner may post (each of junit.xml, report.html).
MAX_REPORT_BYTES = 16 << 20


class RigDeviceBody(RequestBody):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    profile: str = Field(min_length=1, max_length=63)
    kind: str = Field(pattern=r"^(local|netns|ssh|qemu-aarch64)$")


class RigRegister(RequestBody):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    devices: list[RigDeviceBody] = Field(min_length=1, max_length=1000)
    #: The rig file as written (kept for the record; the CLI has validated it).
    text: str = Field(default="", max_length=256 * 1024)


class ClaimBody(RequestBody):
    #: Who runs it (shown in the job and the rollout's events), e.g. ``runner@bench-host``.
    runner: str = Field(min_length=1, max_length=128)


def register_rig(session: Session, body: RigRegister, actor: str) -> HilRigPublic:
    ids = [d.id for d in body.devices]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidInputError(f"rig {body.name!r}: duplicate device id {dup!r}", field="devices")
    rig = session.get(HilRig, body.name)
    now = datetime.now(UTC)
    if rig is None:
        rig = HilRig(name=body.name, devices=[], registered_at=now, registered_by=actor)
    rig.devices = [d.model_dump() for d in body.devices]
    rig.text, rig.registered_at, rig.registered_by = body.text, now, actor
    session.add(rig)
    record(session, actor, "hil.rig.register", body.name, devices=ids)
    session.commit()
    session.refresh(rig)
    return HilRigPublic.model_validate(rig)


def list_rigs(session: Session) -> list[HilRigPublic]:
    rows = session.exec(select(HilRig).order_by(col(HilRig.name))).all()
    return [HilRigPublic.model_validate(r) for r in rows]


def get_rig(session: Session, name: str) -> HilRig:
    rig = session.get(HilRig, name)
    if rig is None:
        raise NotFoundError(
            f"no HIL rig named {name!r}; register it with 'edgefleet hil rigs add FILE'", rig=name
        )
    return rig


def create_job(
    session: Session,
    *,
    rollout_id: str,
    rig: str,
    model: str,
    version: str,
    scenarios: list[str] | None,
    timeout_s: float,
    now: datetime,
) -> HilJob:
    get_rig(session, rig)
    job = HilJob(
        id=uuid.uuid4().hex[:16],
        rollout_id=rollout_id,
        rig=rig,
        model=model,
        version=version,
        scenarios=scenarios,
        created_at=now,
        deadline_at=now + timedelta(seconds=timeout_s),
    )
    session.add(job)
    return job


def job_for_rollout(session: Session, rollout_id: str) -> HilJob | None:
    return session.exec(select(HilJob).where(HilJob.rollout_id == rollout_id)).first()


def get_job(session: Session, job_id: str) -> HilJob:
    job = session.get(HilJob, job_id)
    if job is None:
        raise NotFoundError(f"no HIL job {job_id!r}", job_id=job_id)
    return job


def public(job: HilJob) -> HilJobPublic:
    out = HilJobPublic.model_validate(job)
    if job.report_sha256:
        out.report_url = f"/v1/hil/jobs/{job.id}/report.html"
    if job.junit_sha256:
        out.junit_url = f"/v1/hil/jobs/{job.id}/junit.xml"
    return out


def claim(session: Session, rig_name: str, runner: str, now: datetime) -> tuple[HilJob, str] | None:
    """The rig's oldest pending job, now running and held by ``runner`` with a fresh lease
    token (returned once; only its hash is kept). None when there is nothing to run, or when
    the rig is busy with a job that has not ended."""
    get_rig(session, rig_name)
    expire(session, now, rig=rig_name)
    busy = session.exec(
        select(HilJob).where(HilJob.rig == rig_name, HilJob.state == HilJobState.RUNNING)
    ).first()
    if busy is not None:
        session.commit()  # what expired
        return None
    query = (
        select(HilJob)
        .where(HilJob.rig == rig_name, HilJob.state == HilJobState.PENDING)
        .order_by(col(HilJob.created_at))
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    job = session.exec(query).first()
    if job is None:
        session.commit()
        return None
    token = secrets.token_urlsafe(24)
    job.state, job.claimed_at, job.claimed_by = HilJobState.RUNNING, now, runner
    job.lease_hash = hashlib.sha256(token.encode()).hexdigest()
    session.add(job)
    record(session, runner, "hil.job.claim", job.id, rig=rig_name, rollout_id=job.rollout_id)
    session.commit()
    session.refresh(job)
    return job, token


def post_verdict(
    session: Session,
    store: ArtifactStore,
    job_id: str,
    *,
    lease: str,
    passed: bool,
    summary: dict[str, Any] | None,
    junit: IO[bytes],
    report: IO[bytes],
    actor: str,
    now: datetime,
) -> HilJob:
    """Refused (nothing changes) unless the job is running and ``lease`` is the token it was
    claimed with."""
    job = get_job(session, job_id)
    expected = job.lease_hash or ""
    given = hashlib.sha256(lease.encode()).hexdigest()
    if job.state != HilJobState.RUNNING or not hmac.compare_digest(expected, given):
        raise ConflictError(
            f"HIL job {job_id} is {job.state} and not held by this lease: a runner may post a "
            "verdict only for the job it claimed, while it runs",
            job_id=job_id,
        )
    if now > aware(job.deadline_at):
        expire(session, now, rig=job.rig)
        raise ConflictError(f"HIL job {job_id} passed its deadline; the verdict is too late")
    junit_sha = _store(store, junit, "junit.xml")
    report_sha = _store(store, report, "report.html")
    job.state = HilJobState.PASSED if passed else HilJobState.FAILED
    job.finished_at, job.summary = now, summary
    job.junit_sha256, job.report_sha256 = junit_sha, report_sha
    job.reason = None if passed else _failure_reason(summary)
    session.add(job)
    record(session, actor, "hil.job.verdict", job.id, passed=passed, rollout_id=job.rollout_id)
    session.commit()
    session.refresh(job)
    return job


def _store(store: ArtifactStore, stream: IO[bytes], what: str) -> str:
    scratch = store.scratch_dir()
    path = scratch / what
    size = 0
    with path.open("wb") as out:
        while chunk := stream.read(1 << 16):
            size += len(chunk)
            if size > MAX_REPORT_BYTES:
                path.unlink()
                scratch.rmdir()
                raise InvalidInputError(
                    f"{what} is over {MAX_REPORT_BYTES} bytes", field=what.split(".")[0]
                )
            out.write(chunk)
    sha, _ = store.put_file(path)
    scratch.rmdir()
    return sha


def _failure_reason(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "the rig failed the version"
    if summary.get("error"):
        return f"the rig could not start: {summary['error']}"[:1000]
    failed = [
        f"{name} on {', '.join(d for d, s in v.get('devices', {}).items() if s == 'failed')}"
        for name, v in (summary.get("scenarios") or {}).items()
        if not v.get("passed", True)
    ]
    return ("failed: " + "; ".join(failed))[:1000] if failed else "the rig failed the version"


def expire(session: Session, now: datetime, *, rig: str | None = None) -> list[HilJob]:
    """Open jobs past their deadline become ``timed_out`` (staged; the caller commits)."""
    query = select(HilJob).where(col(HilJob.state).in_([str(s) for s in OPEN_STATES]))
    if rig is not None:
        query = query.where(HilJob.rig == rig)
    expired = []
    for job in session.exec(query).all():
        if now > aware(job.deadline_at):
            who = f"runner {job.claimed_by}" if job.claimed_by else "no runner"
            job.state, job.finished_at = HilJobState.TIMED_OUT, now
            job.reason = (
                f"no verdict by the deadline ({who} {'claimed it' if job.claimed_by else 'came'})"
            )
            session.add(job)
            expired.append(job)
    return expired


def cancel(session: Session, rollout_id: str, why: str, now: datetime) -> None:
    """The rollout ended before a verdict: its open job is cancelled (staged)."""
    job = job_for_rollout(session, rollout_id)
    if job is not None and job.state in OPEN_STATES:
        job.state, job.finished_at, job.reason = HilJobState.CANCELLED, now, why[:1000]
        session.add(job)


def report_sha256(job: HilJob, which: str) -> str:
    sha = job.report_sha256 if which == "report" else job.junit_sha256
    if sha is None:
        raise NotFoundError(f"HIL job {job.id} has no {which} yet", job_id=job.id)
    return sha
