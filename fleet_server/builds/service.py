"""Build jobs: created by ``POST /v1/builds`` or by a rollout (``ensure_bundle``), run by
:class:`~fleet_server.builds.runner.BuildRunner`. A job is keyed by what its artifact depends on
(``cache_key``), so the same inputs are built once.

Each job runs ``python -m converters.job`` as a subprocess: the converter's crash, memory
blow-up or hang fails that job (with its output) and never the server. The job's stdout is
streamed into the build log as it runs. The server signs the result with its current online
key, moves the bundle into the artifact store and only then marks the build succeeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, get_args

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from converters.build import BuildOptions, candidates
from converters.validate import THRESHOLD_NAMES
from edge_agent import __version__ as edgefleet_version
from edge_agent.contracts.errors import ConversionError
from firmware_profiles import Precision, Profile, ProfileCatalog, ProfileError, RuntimeName
from fleet_server.audit.service import record
from fleet_server.builds.states import FINISHED, BuildState
from fleet_server.builds.tables import Build, BuildCreate, BuildLog, BuildPublic
from fleet_server.bundles.tables import Bundle
from fleet_server.database import advisory_lock, aware
from fleet_server.errors import ConflictError, InvalidInputError, NotFoundError
from fleet_server.keys.service import FleetSigner
from fleet_server.registry.service import get_version, version_by_id
from fleet_server.registry.tables import MLModel, ModelVersion

if TYPE_CHECKING:
    from fleet_server.builds.runner import BuildRunner

log = logging.getLogger(__name__)

_KNOWN_RUNTIMES = get_args(RuntimeName)
_KNOWN_PRECISIONS = get_args(Precision)


def toolchain_versions() -> dict[str, str]:
    """Versions of everything that can change a build's output (part of the cache key)."""
    import onnx
    import onnxruntime

    from converters.toolchains import TOOLCHAINS, locate

    versions = {
        "edgefleet": edgefleet_version,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    for name in TOOLCHAINS:
        try:
            for k, v in locate(name).versions.items():
                versions[f"{name}/{k}"] = v
        except ConversionError:
            versions[name] = "not installed"
    return versions


def cache_key(version: ModelVersion, profile: Profile, options: dict[str, Any]) -> str:
    # The model version itself is part of the key: a bundle's signed manifest names its model
    # and version, so the same ONNX bytes uploaded as another version need their own bundle.
    # The runtimes and precisions asked for count only as the candidates they leave, in the
    # order they are tried: "all of them" and "the ones this device has" are the same build
    # when the device has them all (so a build made ahead of a rollout is reused by it).
    tried = candidates(
        profile,
        BuildOptions(
            runtimes=tuple(options["runtimes"]) if options.get("runtimes") is not None else None,
            precisions=tuple(options["precisions"]) if options.get("precisions") else None,
        ),
    )
    material = {
        "model_version": version.id,
        "source": version.source_sha256,
        "calibration": version.calibration_sha256,
        "validation": version.validation_sha256,
        "profile": profile.to_dict(),
        "candidates": [[c.runtime, c.precision] for c in tried],
        "thresholds": options.get("thresholds") or {},
        "fp32_inputs": options.get("fp32_inputs"),
        "toolchains": toolchain_versions(),
    }
    # Not a signed document: profiles hold infinite thresholds ("no limit"), which canonical
    # JSON refuses; the key only needs the same bytes for the same material.
    key = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()


def normalize_options(
    thresholds: dict[str, float | None] | None,
    runtimes: list[str] | None,
    precisions: list[str] | None,
    fp32_inputs: list[str] | None = None,
) -> dict[str, Any]:
    known = set(THRESHOLD_NAMES)
    unknown = sorted(set(thresholds or {}) - known)
    if unknown:
        raise InvalidInputError(
            f"unknown parity threshold(s) {unknown}; known: {sorted(known)}", field="thresholds"
        )
    for name, allowed, values in (
        ("runtimes", _KNOWN_RUNTIMES, runtimes),
        ("precisions", _KNOWN_PRECISIONS, precisions),
    ):
        bad = sorted(set(values or []) - set(allowed))
        if bad:
            raise InvalidInputError(f"unknown {name} {bad}; known: {list(allowed)}", field=name)
    return {
        "thresholds": dict(sorted((thresholds or {}).items())),
        "runtimes": sorted(runtimes) if runtimes is not None else None,
        "precisions": sorted(precisions) if precisions else None,
        "fp32_inputs": sorted(set(fp32_inputs)) if fp32_inputs is not None else None,
    }


def usable_bundle(session: Session, key: str, signer: FleetSigner) -> Bundle | None:
    rows = session.exec(select(Bundle).where(Bundle.cache_key == key)).all()
    usable = [b for b in rows if signer.usable(b.signing_key_id)]
    usable.sort(key=lambda b: (b.signing_key_id == signer.keyid, aware(b.created_at)), reverse=True)
    return usable[0] if usable else None


def request_build(
    session: Session,
    runner: BuildRunner,
    signer: FleetSigner,
    model: MLModel,
    version: ModelVersion,
    profile: Profile,
    options: dict[str, Any],
    actor: str,
    key: str | None = None,
) -> Build:
    """The build for these inputs: a finished one whose bundle is still usable, one already
    queued or running, or a new job. ``key``: the inputs' cache key, when already known."""
    key = key or cache_key(version, profile, options)
    advisory_lock(session, f"build/{key}")  # two servers asking at once make one build
    existing = session.exec(
        select(Build).where(Build.cache_key == key).order_by(col(Build.created_at).desc())
    ).all()
    for build in existing:
        if build.state in (BuildState.QUEUED, BuildState.RUNNING):
            return build
        if build.state == BuildState.SUCCEEDED and usable_bundle(session, key, signer) is not None:
            return build
    assert version.id is not None
    build = Build(
        id=uuid.uuid4().hex[:16],
        model_version_id=version.id,
        profile=profile.name,
        cache_key=key,
        state=BuildState.QUEUED,
        options=options,
        created_at=datetime.now(UTC),
        created_by=actor,
    )
    session.add(build)
    record(
        session, actor, "build.create", build.id, model=model.name, version=version.version,
        profile=profile.name, options=options,
    )  # fmt: skip
    session.commit()
    session.refresh(build)
    runner.submit(build.id)
    return build


def create_build(
    session: Session,
    runner: BuildRunner,
    catalog: ProfileCatalog,
    signer: FleetSigner,
    body: BuildCreate,
    actor: str,
) -> BuildPublic:
    model, version = get_version(session, body.model, body.version)
    try:
        profile = catalog.get(body.profile)
    except ProfileError as e:
        raise InvalidInputError(
            f"unknown profile {body.profile!r}; see GET /v1/profiles", field="profile"
        ) from e
    options = normalize_options(body.thresholds, body.runtimes, body.precisions, body.fp32_inputs)
    build = request_build(session, runner, signer, model, version, profile, options, actor)
    return to_public(session, build)


def to_public(session: Session, build: Build) -> BuildPublic:
    model, version = version_by_id(session, build.model_version_id)
    return BuildPublic.model_validate(
        build, update={"model": model.name, "version": version.version, "seconds": None}
    )


def get_build(session: Session, build_id: str) -> Build:
    build = session.get(Build, build_id)
    if build is None:
        raise NotFoundError(f"no build {build_id!r}", build_id=build_id)
    return build


def list_builds(session: Session, model: str | None, limit: int) -> list[BuildPublic]:
    query = select(Build).order_by(col(Build.created_at).desc()).limit(limit)
    if model is not None:
        query = (
            select(Build)
            .join(ModelVersion, col(ModelVersion.id) == col(Build.model_version_id))
            .join(MLModel, col(MLModel.id) == col(ModelVersion.model_id))
            .where(MLModel.name == model)
            .order_by(col(Build.created_at).desc())
            .limit(limit)
        )
    return [to_public(session, b) for b in session.exec(query).all()]


def read_log(session: Session, build_id: str, offset: int) -> BuildLog:
    build = get_build(session, build_id)
    text = build.log[offset:] if offset >= 0 else build.log
    return BuildLog(
        id=build.id, state=BuildState(build.state), text=text, next_offset=len(build.log)
    )


def wait_for(engine: Engine, build_id: str, timeout_s: float) -> Build:
    """Block until the build has finished (or ``timeout_s``), polling the database."""
    deadline = time.monotonic() + timeout_s
    while True:
        with Session(engine) as session:
            build = get_build(session, build_id)
            if build.state in FINISHED or time.monotonic() > deadline:
                session.expunge(build)
                return build
        time.sleep(0.2)


def ensure_bundle(
    session: Session,
    runner: BuildRunner,
    model: MLModel,
    version: ModelVersion,
    profile: Profile,
    signer: FleetSigner,
    *,
    runtimes: list[str] | None = None,
    actor: str = "system",
    wait_s: float,
) -> Bundle:
    """The bundle for (version, profile, runtimes) signed by a usable key; when there is none,
    a build job makes it (or one already under way is awaited) for up to ``wait_s``.
    Still building after that: ConflictError ``build_pending`` with the build's id."""
    options = normalize_options(None, runtimes, None)
    key = cache_key(version, profile, options)
    found = usable_bundle(session, key, signer)
    if found is not None:
        return found
    build = request_build(session, runner, signer, model, version, profile, options, actor, key)
    build_id = build.id
    done = wait_for(runner.engine, build_id, wait_s)
    if done.state == BuildState.FAILED:
        error = done.error or {}
        raise ConversionError(
            f"the build for profile {profile.name!r} failed (edgefleet builds show {build_id}): "
            f"{error.get('message', 'unknown error')}",
            reason=str(error.get("reason", "build_failed")),
            build_id=build_id,
            profile=profile.name,
        )
    if done.state != BuildState.SUCCEEDED:
        raise ConflictError(
            f"the build for profile {profile.name!r} is still {done.state} after "
            f"{wait_s:.0f} s; create the rollout again when "
            f"`edgefleet builds show {build_id}` says succeeded",
            reason="build_pending",
            build_id=build_id,
        )
    session.expire_all()
    found = usable_bundle(session, key, signer)
    if found is None:
        raise ConflictError(
            f"build {build_id} succeeded but its bundle is no longer usable (signing key "
            "rotated meanwhile); create the rollout again",
            reason="build_pending",
        )
    return found
