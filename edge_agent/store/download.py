"""Downloading a bundle over HTTP: resumable, bounded, optionally rate-limited.

The server is trusted for nothing here: a response longer than the desired state's ``size``
is cut off and refused, and the sha256 of the bytes must equal the desired state's before the
file is moved to its final name. An interrupted download (network drop, agent crash, power
loss) leaves ``<sha256>.part``; the next attempt asks for the rest with ``Range`` and keeps
the bytes it has when the server honours it (206 from the right offset), else starts over.
A part file is named by the digest it must reach, so resuming can never mix two bundles.
The server may redirect the request to a presigned URL of its object store: ``Range`` follows
the redirect, the device's credential does not.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edge_agent.contracts import failpoints
from edge_agent.contracts.errors import BundleError, Superseded, TransportError

log = logging.getLogger(__name__)

_CHUNK = 16 << 10


class InsufficientSpaceError(TransportError):
    """Not enough free disk for the bundle; retrying later (after clean-up) may work."""

    reason = "insufficient_space"


def check_free_space(directory: Path, needed: int, reserve_bytes: int) -> None:
    """The bundle and its extracted copy must fit, with ``reserve_bytes`` left over."""
    free = shutil.disk_usage(directory).free
    if free - 2 * needed < reserve_bytes:
        raise InsufficientSpaceError(
            f"{free} bytes free, a {needed}-byte bundle needs {2 * needed} plus the "
            f"{reserve_bytes}-byte reserve",
            free_bytes=free,
            needed_bytes=2 * needed,
        )


def download_bundle(
    url: str,
    dest: Path,
    partial: Path,
    *,
    size: int,
    sha256: str,
    credential: str,
    timeout_s: float,
    max_bytes_per_s: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """One attempt; what arrived stays in ``partial`` for the next one. ``cancelled`` is asked
    between chunks: when it says so, :class:`Superseded` ends the download (the part file
    stays, so a document naming this bundle again resumes it)."""
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    if have:
        with partial.open("rb") as f:
            h = hashlib.file_digest(f, "sha256")  # resumed: the hash continues from here
    else:
        h = hashlib.sha256()
    headers = {"Range": f"bytes={have}-"} if have else {}
    request = urllib.request.Request(url, headers=headers)
    # The credential is for the server alone: a redirect (to a presigned URL of the server's
    # object store) does not carry it, while Range goes along. S3 refuses a request that
    # authenticates twice, and a store has no business seeing the device's credential.
    request.add_unredirected_header("Authorization", f"Bearer {credential}")
    received = have
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if have and not (
                response.status == 206
                and (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-")
            ):
                log.info("server ignored the range request; downloading from the start")
                h, have, received = hashlib.sha256(), 0, 0
            elif have:
                log.info("resuming download at %d of %d bytes", have, size)
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > size - have:
                raise BundleError(
                    f"server offers {int(declared) + have} bytes, the desired state says {size}",
                    reason="oversize",
                    bundle_sha256=sha256,
                )
            start, start_bytes = clock(), received
            with partial.open("ab" if have else "wb") as out:
                while received < size:
                    chunk = response.read(min(_CHUNK, size - received))
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    if max_bytes_per_s:
                        ahead = (received - start_bytes) / max_bytes_per_s - (clock() - start)
                        if ahead > 0:
                            sleep(ahead)
                    out.flush()
                    failpoints.hit("download.chunk")
                    if cancelled():
                        raise Superseded("a newer desired state took over this download")
                if received == size and response.read(1):
                    raise BundleError(
                        f"server sent more than the declared {size} bytes",
                        reason="oversize",
                        bundle_sha256=sha256,
                    )
    except urllib.error.HTTPError as e:
        if e.code == 416:  # our part file is not a prefix the server knows: start over
            partial.unlink(missing_ok=True)
        raise TransportError(
            f"bundle download failed: HTTP {e.code} {e.reason}", status=e.code
        ) from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        # Keep what arrived: the next attempt resumes from there.
        raise TransportError(f"bundle download failed: {e}", received_bytes=received) from e
    except BundleError:
        partial.unlink(missing_ok=True)
        raise
    if received < size:
        raise TransportError(
            f"bundle download ended after {received} of {size} bytes", received_bytes=received
        )
    if h.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise BundleError(
            "downloaded bundle's sha256 does not match the desired state",
            reason="digest_mismatch",
            bundle_sha256=sha256,
        )
    partial.replace(dest)


def fetch_bundle(
    url: str,
    dest: Path,
    partial: Path,
    *,
    size: int,
    sha256: str,
    credential: str,
    timeout_s: float,
    attempts: int,
    max_bytes_per_s: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """:func:`download_bundle`, tried up to ``attempts`` times with jittered exponential
    backoff between them (``uniform(0, 1.5 ** attempt)`` seconds, so a fleet that lost the
    server at once does not come back at once). Untrusted bytes (``BundleError``) and a
    newer desired state (``Superseded``) end it at once."""
    for attempt in range(1, attempts + 1):
        try:
            download_bundle(
                url, dest, partial, size=size, sha256=sha256, credential=credential,
                timeout_s=timeout_s, max_bytes_per_s=max_bytes_per_s, sleep=sleep,
                cancelled=cancelled,
            )  # fmt: skip
            return
        except TransportError as e:
            if attempt == attempts:
                raise
            delay = random.uniform(0, 1.5 ** min(10, attempt))
            log.warning(
                "download attempt %d/%d failed (%s); retrying in %.1fs", attempt, attempts, e, delay
            )
            sleep(delay)
            if cancelled():
                raise Superseded("a newer desired state took over this download") from e
