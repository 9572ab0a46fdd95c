"""/v1/models: upload ONNX versions, list and show models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.artifacts.responses import blob_response
from fleet_server.registry import service
from fleet_server.registry.tables import ModelPublic, ModelVersionPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("", status_code=201, response_model=ModelVersionPublic)
def upload_model_version(
    state: StateDep,
    session: SessionDep,
    principal: Operator,
    file: Annotated[UploadFile, File(description="the ONNX model")],
    name: Annotated[str, Form()],
    version: Annotated[str, Form(description="semantic version, e.g. 1.0.0")],
    description: Annotated[str, Form()] = "",
    calibration: Annotated[
        UploadFile | None,
        File(
            description=".npz calibration set: one array per input name; one sample is one "
            "complete feed of that input (any rank, scalars too), stacked on a new leading axis"
        ),
    ] = None,
    validation: Annotated[
        UploadFile | None,
        File(description=".npz validation set (default: a held-out part of the calibration set)"),
    ] = None,
    output_kinds: Annotated[
        str,
        Form(
            description='JSON {"output name": kind}: class_scores, embedding, regression, '
            "boxes or auto; each is gated with a fitting measure"
        ),
    ] = "",
    card: Annotated[
        UploadFile | None, File(description="the model card (Markdown, UTF-8, at most 64 KiB)")
    ] = None,
    meta: Annotated[
        str,
        Form(
            description='JSON {"key": "value"}: training data reference, commit, owner, offline '
            "metrics (keys are identifiers; at most 64)"
        ),
    ] = "",
    parents: Annotated[
        str, Form(description="comma-separated versions of this model it was derived from")
    ] = "",
) -> ModelVersionPublic:
    """Upload a new model version (multipart). The file must pass ``onnx.checker``; the
    calibration and validation sets must match the model's input names, dtypes and shapes.
    A version is immutable once pushed: its card, metadata and parents too."""
    return service.upload_version(
        session,
        state.store,
        name=name,
        version=version,
        description=description,
        filename=file.filename or "model.onnx",
        stream=file.file,
        max_bytes=state.settings.max_upload_bytes,
        actor=principal.name,
        calibration=calibration.file if calibration is not None else None,
        validation=validation.file if validation is not None else None,
        output_kinds=output_kinds,
        card=card.file if card is not None else None,
        meta=meta,
        parents=parents,
    )


@router.get("", response_model=list[ModelPublic])
def list_models(session: SessionDep, _: Viewer) -> list[ModelPublic]:
    return service.list_models(session)


@router.get("/{name}", response_model=ModelPublic)
def show_model(name: str, session: SessionDep, _: Viewer) -> ModelPublic:
    return service.get_model(session, name)


@router.get("/{name}/versions/{version}", response_model=ModelVersionPublic)
def show_version(name: str, version: str, session: SessionDep, _: Viewer) -> ModelVersionPublic:
    return service.get_version_public(session, name, version)


@router.get(
    "/{name}/versions/{version}/onnx",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"content": {"application/octet-stream": {}}},
        416: {"description": "the range starts past the file's end"},
    },
)
def download_onnx(
    name: str, version: str, request: Request, state: StateDep, session: SessionDep, _: Operator
) -> Response:
    """The ONNX file as uploaded (for reference predictions, e.g. a HIL run's)."""
    row = service.get_version(session, name, version)[1]
    return blob_response(
        state.store,
        row.source_sha256,
        request,
        session=session,
        media_type="application/octet-stream",
        filename=row.filename,
    )
