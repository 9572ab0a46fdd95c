"""Blobs as HTTP responses: streamed through the server with ``Range`` (from either store),
or, for a device downloading a bundle from an S3 store configured for it, a redirect to a
short-lived presigned URL so that the bytes go straight from the store."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlmodel import Session
from starlette.background import BackgroundTask

from fleet_server.artifacts.base import ArtifactStore, RangeNotSatisfiable


def blob_response(
    store: ArtifactStore,
    sha256: str,
    request: Request,
    *,
    session: Session,
    media_type: str,
    filename: str | None = None,
) -> Response:
    """The blob, or the single range the request's ``Range`` header asks for (206); 416 for a
    range past its end. The store is read a chunk at a time as the client takes them.

    ``session`` (the route's, done with) is closed first: the response streams for as long
    as the client takes (minutes, to a slow device) and the store may take a while to answer,
    so the database connection goes back to the pool now, or a fleet downloading at once
    would hold every connection and all other requests would wait for one."""
    session.close()
    try:
        blob = store.read(sha256, request.headers.get("range"))
    except RangeNotSatisfiable as e:
        size = str(e.size) if e.size >= 0 else "*"
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    headers = dict(blob.headers)
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(
        blob.chunks,
        status_code=blob.status,
        headers=headers,
        media_type=media_type,
        background=BackgroundTask(blob.close),
    )


def presigned_redirect(store: ArtifactStore, sha256: str, expires_s: int) -> Response | None:
    """307 to a presigned URL for the blob, or None when the store cannot give one."""
    url = store.presigned_url(sha256, expires_s)
    if url is None:
        return None
    # 307 keeps the method; the agent sends its Range again and drops its Authorization.
    return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
