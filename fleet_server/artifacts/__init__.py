"""The artifact store: uploaded models and datasets, built bundles and HIL reports, each a
blob addressed by its sha256 (``sha256/ab/abcdef…``; the first two hex digits fan them out).

Two back ends behind one interface (:class:`ArtifactStore`):

- a local directory (:mod:`.local`), the embedded default (``<data_dir>/artifacts``);
- an S3-compatible bucket (:mod:`.s3`), ``EDGEFLEET_ARTIFACTS_URL=s3://bucket/prefix``, with
  the endpoint and credentials from the usual AWS variables (boto3 reads them).

A blob appears whole or not at all (an atomic rename, an S3 PUT), and a row that names a blob
is written only after :meth:`ArtifactStore.put_file` returned, so the database never names a
blob that is not there. Content addressing makes writes idempotent.
"""

from __future__ import annotations

from pathlib import Path

from fleet_server.artifacts.base import ArtifactStore, BlobRead, RangeNotSatisfiable
from fleet_server.artifacts.local import LocalArtifactStore
from fleet_server.artifacts.s3 import S3ArtifactStore
from fleet_server.settings import Settings

__all__ = [
    "ArtifactStore",
    "BlobRead",
    "LocalArtifactStore",
    "RangeNotSatisfiable",
    "S3ArtifactStore",
    "open_store",
]


def open_store(settings: Settings) -> ArtifactStore:
    """The store ``EDGEFLEET_ARTIFACTS_URL`` names: ``s3://bucket/prefix``, or a directory
    (default ``<data_dir>/artifacts``)."""
    url = settings.artifacts_url
    if url and url.startswith("s3://"):
        return S3ArtifactStore.from_url(
            url,
            spool=settings.data_dir / "artifacts-spool",
            presign_endpoint=settings.artifacts_presign_endpoint,
        )
    if url:
        return LocalArtifactStore(Path(url.removeprefix("file://")).expanduser())
    return LocalArtifactStore(settings.artifacts_dir)
