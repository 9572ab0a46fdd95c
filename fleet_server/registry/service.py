"""Uploading and looking up model versions.

An upload is checked completely (name, semantic version, not a duplicate, a valid ONNX file)
before anything is stored; a rejected upload leaves no row and no file behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from converters.onnx.isolated import inspect_isolated
from converters.validate import OutputKind
from edge_agent.contracts.errors import ConversionError
from fleet_server.artifacts import ArtifactStore
from fleet_server.audit.service import record
from fleet_server.errors import ConflictError, InvalidInputError, NotFoundError
from fleet_server.registry.tables import MLModel, ModelPublic, ModelVersion, ModelVersionPublic

log = logging.getLogger(__name__)

#: The longest an uploaded model and its sets may take to check (in a child process).
INSPECT_TIMEOUT_S = 600.0

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
# Semantic Versioning 2.0.0.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def _json_object(text: str, field: str, shape: str) -> dict[str, Any]:
    """A form field holding a JSON object (empty: none); ``shape`` shows one in the error."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidInputError(f"{field} is not JSON: {e}", field=field) from e
    if not isinstance(value, dict):
        raise InvalidInputError(f"{field} must be a JSON object {shape}", field=field)
    return value


def _output_kinds(text: str, names: list[str]) -> dict[str, str]:
    """The ``output_kinds`` form field: a JSON object naming outputs of this model."""
    kinds = _json_object(text, "output_kinds", '{"output": kind}')
    unknown = sorted(set(kinds) - set(names))
    if unknown:
        raise InvalidInputError(
            f"output_kinds names {unknown}, not outputs of this model ({names})",
            field="output_kinds",
        )
    allowed = [k.value for k in OutputKind]
    bad = {n: k for n, k in kinds.items() if k not in allowed}
    if bad:
        raise InvalidInputError(
            f"output_kinds {bad}: a kind is one of {allowed}", field="output_kinds"
        )
    return {str(n): str(k) for n, k in kinds.items()}


#: A model card is Markdown text, at most this long.
MAX_CARD_BYTES = 64 * 1024
MAX_META_KEYS = 64
MAX_META_VALUE = 1024
META_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _card(card: BinaryIO | None) -> str:
    if card is None:
        return ""
    data = card.read(MAX_CARD_BYTES + 1)
    if len(data) > MAX_CARD_BYTES:
        raise InvalidInputError(
            f"the model card is over {MAX_CARD_BYTES // 1024} KiB; link long documents from it",
            field="card",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"the model card is not UTF-8 text ({e})", field="card") from e
    if "\x00" in text:
        raise InvalidInputError("the model card is not text (it holds NUL bytes)", field="card")
    return text


def _meta(text: str) -> dict[str, str]:
    """The ``meta`` form field: a JSON object of identifier keys and string values."""
    meta = _json_object(text, "meta", '{"key": "value"}')
    if len(meta) > MAX_META_KEYS:
        raise InvalidInputError(f"meta has {len(meta)} keys (limit {MAX_META_KEYS})", field="meta")
    bad = sorted(k for k in meta if not META_KEY.match(k))
    if bad:
        raise InvalidInputError(
            f"meta keys {bad} are not identifiers (letters, digits, '_'; not first a digit)",
            field="meta",
        )
    for key, value in meta.items():
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise InvalidInputError(f"meta {key}: a string or a number, not {value!r}",
                                    field="meta")  # fmt: skip
        if len(str(value)) > MAX_META_VALUE:
            raise InvalidInputError(f"meta {key}: over {MAX_META_VALUE} characters", field="meta")
    return {k: str(v) for k, v in meta.items()}


def _parents(session: Session, model: MLModel | None, name: str, text: str) -> list[str]:
    parents = [p.strip() for p in text.split(",") if p.strip()]
    for parent in parents:
        if model is None or _find_version(session, model, parent) is None:
            raise InvalidInputError(
                f"parent {name} {parent} does not exist; push it first (or name no parent)",
                field="parents",
            )
    return list(dict.fromkeys(parents))


def _check_names(name: str, version: str) -> None:
    if not MODEL_NAME.match(name):
        raise InvalidInputError(
            f"model name {name!r} must be lowercase letters, digits, '.', '_' or '-' (max 128)",
            field="name",
        )
    if not SEMVER.match(version):
        raise InvalidInputError(
            f"version {version!r} is not a semantic version (e.g. 1.2.0)", field="version"
        )


def upload_version(
    session: Session,
    store: ArtifactStore,
    *,
    name: str,
    version: str,
    description: str,
    filename: str,
    stream: BinaryIO,
    max_bytes: int,
    actor: str,
    calibration: BinaryIO | None = None,
    validation: BinaryIO | None = None,
    output_kinds: str = "",
    card: BinaryIO | None = None,
    meta: str = "",
    parents: str = "",
) -> ModelVersionPublic:
    """Store a model version, with its calibration / validation sets (``.npz``, one array per
    input, axis 0 = samples) when given, its model card, metadata and parents. Everything is
    checked before anything is stored."""
    _check_names(name, version)
    model = session.exec(select(MLModel).where(MLModel.name == name)).first()
    if model is not None and _find_version(session, model, version) is not None:
        raise ConflictError(f"{name} {version} already exists; versions are immutable")
    card_text = _card(card)
    meta_values = _meta(meta)
    lineage = _parents(session, model, name, parents)

    # Every part is written to the store's scratch space as it arrives, in chunks, and hashed
    # on the way; the model and its sets are checked in a child process (whatever their size,
    # this process holds a chunk at a time).
    scratch = store.scratch_dir()
    try:
        tmp, sha256, size = _receive(stream, scratch / "upload.onnx", max_bytes, "file")
        received: dict[str, tuple[Path, str]] = {}
        for what, upload in (("calibration", calibration), ("validation", validation)):
            if upload is not None:
                path, digest, _ = _receive(upload, scratch / f"{what}.npz", max_bytes, what)
                received[what] = (path, digest)
        try:
            checked = inspect_isolated(
                tmp, {what: path for what, (path, _) in received.items()},
                timeout_s=INSPECT_TIMEOUT_S,
            )  # fmt: skip
        except ConversionError as e:
            failed = e.fields.get("dataset")
            if failed in received:
                raise InvalidInputError(e.message, field=failed, **e.fields) from e
            raise InvalidInputError(f"{filename}: {e.message}", field="file") from e
        info = checked.info
        log.info(
            "inspected %s %s (%d bytes) in a child process: peak %.0f MiB",
            name, version, size, checked.peak_mib,
        )  # fmt: skip
        kinds = _output_kinds(output_kinds, [s.name for s in info.outputs])
        stored = {
            what: store.put_file(path, digest)[0] for what, (path, digest) in received.items()
        }
        store.put_file(tmp, sha256)
        sets = {what: (stored[what], checked.samples[what]) for what in received}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    now = datetime.now(UTC)
    try:
        if model is None:
            model = MLModel(name=name, created_at=now)
            session.add(model)
            session.flush()
        assert model.id is not None
        row = ModelVersion(
            model_id=model.id,
            version=version,
            description=description,
            source_sha256=sha256,
            size=size,
            filename=filename[:255],
            opset=info.opset,
            ir_version=info.ir_version,
            producer=info.producer,
            inputs=[s.to_dict() for s in info.inputs],
            outputs=[
                {**s.to_dict(), **({"kind": kinds[s.name]} if s.name in kinds else {})}
                for s in info.outputs
            ],
            calibration_sha256=sets["calibration"][0] if "calibration" in sets else None,
            calibration_samples=sets["calibration"][1] if "calibration" in sets else None,
            validation_sha256=sets["validation"][0] if "validation" in sets else None,
            validation_samples=sets["validation"][1] if "validation" in sets else None,
            card=card_text,
            meta=meta_values,
            parents=lineage,
            created_at=now,
            created_by=actor,
        )
        session.add(row)
        record(session, actor, "model.upload", f"{name} {version}", sha256=sha256, size=size)
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise ConflictError(f"{name} {version} already exists; versions are immutable") from e
    session.refresh(row)
    return public_version(row, name)


def _receive(stream: BinaryIO, dest: Path, max_bytes: int, field: str) -> tuple[Path, str, int]:
    """Copy an uploaded part to ``dest`` a chunk at a time, hashing it on the way; returns
    the path, its sha256 and its size."""
    size = 0
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        while chunk := stream.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise InvalidInputError(
                    f"{field}: upload exceeds the limit of {max_bytes} bytes", field=field
                )
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise InvalidInputError(f"the uploaded {field} is empty", field=field)
    return dest, digest.hexdigest(), size


def _find_version(session: Session, model: MLModel, version: str) -> ModelVersion | None:
    return session.exec(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    ).first()


def public_version(row: ModelVersion, name: str) -> ModelVersionPublic:
    return ModelVersionPublic(model=name, **row.model_dump(exclude={"id", "model_id"}))


def get_version(session: Session, name: str, version: str) -> tuple[MLModel, ModelVersion]:
    model = session.exec(select(MLModel).where(MLModel.name == name)).first()
    if model is None:
        raise NotFoundError(f"no model named {name!r}", model=name)
    row = _find_version(session, model, version)
    if row is None:
        raise NotFoundError(
            f"model {name!r} has no version {version!r}", model=name, version=version
        )
    return model, row


def version_by_id(session: Session, version_id: int) -> tuple[MLModel, ModelVersion]:
    """(model, version) of a stored version id (rows that reference a version keep it alive)."""
    version = session.get(ModelVersion, version_id)
    assert version is not None, f"model version {version_id} vanished"
    model = session.get(MLModel, version.model_id)
    assert model is not None, f"model {version.model_id} vanished"
    return model, version


def get_version_public(session: Session, name: str, version: str) -> ModelVersionPublic:
    _, row = get_version(session, name, version)
    return public_version(row, name)


def describe_model(session: Session, model: MLModel) -> ModelPublic:
    rows = session.exec(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id)
        .order_by(col(ModelVersion.created_at))
    ).all()
    return ModelPublic(
        name=model.name,
        created_at=model.created_at,
        versions=[public_version(r, model.name) for r in rows],
    )


def list_models(session: Session) -> list[ModelPublic]:
    models = session.exec(select(MLModel).order_by(col(MLModel.name))).all()
    return [describe_model(session, m) for m in models]


def get_model(session: Session, name: str) -> ModelPublic:
    model = session.exec(select(MLModel).where(MLModel.name == name)).first()
    if model is None:
        raise NotFoundError(f"no model named {name!r}", model=name)
    return describe_model(session, model)
