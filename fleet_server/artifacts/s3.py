"""The S3 artifact store: blobs in a bucket of any S3-compatible object store (AWS S3, MinIO,
Ceph RGW, Cloudflare R2, …), through boto3 (``pip install 'edgefleet[server,s3]'``).

``EDGEFLEET_ARTIFACTS_URL=s3://bucket/prefix``; the endpoint, region and credentials come from
the usual AWS variables and files, read by boto3 itself (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an
instance role, …). Objects are ``<prefix>/sha256/ab/abcdef…``.

Uploads go from a local spool file (``<data_dir>/artifacts-spool``) as a multipart upload of
8 MiB parts, four at a time, so a large model costs the server process a bounded amount of
memory. A PUT is atomic: an object is whole or absent.

Presigned GETs are signed without ``Range`` (only ``host`` is a signed header): the agent
then sends ``Range`` to resume and S3 honours it, while a URL signed *with* a ``Range``
header is refused with SignatureDoesNotMatch whenever the request's differs (a known SDK
trap). They may be signed for another endpoint than the server's own
(``EDGEFLEET_ARTIFACTS_PRESIGN_ENDPOINT``: devices reach the store by another name than the
server does).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from edge_agent.bundle import sha256_file
from edge_agent.contracts.errors import ConfigError
from fleet_server.artifacts.base import (
    ArtifactStore,
    BlobRead,
    RangeNotSatisfiable,
    blob_key,
    sweep_scratch,
)
from fleet_server.errors import NotFoundError, UnavailableError

_MiB = 1 << 20
#: Multipart part size and parallel parts: at most 32 MiB of parts in memory at once.
PART_BYTES = 8 * _MiB
PART_CONCURRENCY = 4
_CHUNK = 1 << 16


def _boto() -> tuple[Any, Any, Any]:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError as e:
        raise ConfigError(
            "EDGEFLEET_ARTIFACTS_URL=s3://… needs boto3: pip install 'edgefleet[server,s3]'"
        ) from e
    return boto3, botocore.config, botocore.exceptions


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        spool: Path,
        client: Any = None,
        presign_client: Any = None,
    ) -> None:
        boto3, config, self._errors = _boto()
        from boto3.s3.transfer import TransferConfig

        cfg = config.Config(
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 4},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
        )
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or boto3.client("s3", config=cfg)
        self.presign_client = presign_client or self.client
        self.spool = spool
        spool.mkdir(parents=True, exist_ok=True)
        self._transfer = TransferConfig(
            multipart_threshold=PART_BYTES,
            multipart_chunksize=PART_BYTES,
            max_concurrency=PART_CONCURRENCY,
        )

    @classmethod
    def from_url(
        cls, url: str, *, spool: Path, presign_endpoint: str | None = None
    ) -> S3ArtifactStore:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(
                f"EDGEFLEET_ARTIFACTS_URL={url!r} names no bucket (s3://bucket/prefix)",
                field="artifacts_url",
            )
        boto3, config, _ = _boto()
        presign_client = None
        if presign_endpoint:
            presign_client = boto3.client(
                "s3",
                endpoint_url=presign_endpoint,
                config=config.Config(signature_version="s3v4"),
            )
        return cls(bucket, prefix, spool=spool, presign_client=presign_client)

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/{blob_key(sha256)}" if self.prefix else blob_key(sha256)

    # -- writing -----------------------------------------------------------------------------

    def scratch_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.spool))

    def put_file(self, src: Path, sha256: str | None = None) -> tuple[str, int]:
        size = src.stat().st_size
        digest = sha256 or sha256_file(src)
        try:
            if not self.exists(digest):  # content-addressed: the same bytes are there already
                with self._failures(f"upload {digest[:12]} to"):
                    self.client.upload_file(
                        str(src),
                        self.bucket,
                        self.key(digest),
                        ExtraArgs={"Metadata": {"sha256": digest}},
                        Config=self._transfer,
                    )
        finally:
            src.unlink(missing_ok=True)
        return digest, size

    # -- reading -----------------------------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        try:
            with self._failures("look for a blob in", missing=sha256):
                self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except NotFoundError:
            return False
        return True

    def materialize(self, sha256: str, dest: Path) -> Path:
        part = dest.with_name(dest.name + ".part")
        with self._failures("download a blob from", missing=sha256):
            self.client.download_file(
                self.bucket, self.key(sha256), str(part), Config=self._transfer
            )
        part.replace(dest)
        return dest

    @contextlib.contextmanager
    def open(self, sha256: str) -> Iterator[IO[bytes]]:
        with self._failures("read a blob from", missing=sha256):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
        try:
            yield body
        finally:
            body.close()

    def read(self, sha256: str, range_header: str | None) -> BlobRead:
        args = {"Bucket": self.bucket, "Key": self.key(sha256)}
        if range_header:
            args["Range"] = range_header  # S3 parses it as HTTP does; the answer says how
        try:
            with self._failures("read a blob from", missing=sha256):
                got = self.client.get_object(**args)
        except self._errors.ClientError as e:  # only InvalidRange gets here
            size = e.response.get("Error", {}).get("ActualObjectSize", "*")
            raise RangeNotSatisfiable(int(size) if str(size).isdigit() else -1) from e
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(got["ContentLength"])}
        if got.get("ContentRange"):
            headers["Content-Range"] = got["ContentRange"]
        body = got["Body"]
        status = 206 if got.get("ContentRange") else 200
        return BlobRead(status, headers, body.iter_chunks(_CHUNK), body.close)

    def presigned_url(self, sha256: str, expires_s: int) -> str:
        # Never a Range parameter here: see the module's docstring.
        url: str = self.presign_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.key(sha256)},
            ExpiresIn=expires_s,
        )
        return url

    # -- start-up check and errors -----------------------------------------------------------

    def check(self) -> None:
        """The bucket exists and these credentials may read it (a HEAD of the bucket, then a
        listing of one key under the prefix: some stores allow the one and not the other)."""
        try:
            with self._failures("reach"):
                self.client.head_bucket(Bucket=self.bucket)
                self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except UnavailableError as e:
            raise ConfigError(f"artifact store: {e.message}", field="artifacts_url") from e
        except NotFoundError as e:
            raise ConfigError(
                f"artifact store: bucket {self.bucket!r} does not exist at "
                f"{self.client.meta.endpoint_url} (create it, or fix EDGEFLEET_ARTIFACTS_URL "
                "or AWS_ENDPOINT_URL)",
                field="artifacts_url",
            ) from e
        sweep_scratch(self.spool)

    @contextlib.contextmanager
    def _failures(self, doing: str, *, missing: str | None = None) -> Iterator[None]:
        """boto's exceptions, as edgefleet's: a missing object is NotFoundError, everything
        else that stops the store UnavailableError naming what to fix; InvalidRange passes."""
        errors = self._errors
        where = f"{self.url} at {self.client.meta.endpoint_url}"
        try:
            yield
        except errors.NoCredentialsError as e:
            raise UnavailableError(
                f"cannot {doing} {where}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            ) from e
        except (errors.EndpointConnectionError, errors.ConnectTimeoutError) as e:
            raise UnavailableError(
                f"cannot {doing} {where}: the endpoint does not answer ({e}); check "
                "AWS_ENDPOINT_URL"
            ) from e
        except errors.ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "InvalidRange":
                raise
            if code in ("404", "NoSuchKey", "NotFound") and missing is not None:
                raise NotFoundError(
                    f"blob {missing} is missing from the artifact store {self.url}"
                ) from e
            if code in ("404", "NoSuchBucket"):
                raise NotFoundError(f"bucket {self.bucket!r} does not exist") from e
            if status == 403 or code in (
                "403",
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
            ):
                raise UnavailableError(
                    f"cannot {doing} {where}: access denied ({code}); check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket's policy"
                ) from e
            raise UnavailableError(
                f"cannot {doing} {where}: {code or status} {error.get('Message', '')}".strip()
            ) from e
        except errors.BotoCoreError as e:
            raise UnavailableError(f"cannot {doing} {where}: {e}") from e
