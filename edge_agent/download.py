"""Downloading a bundle over HTTP, never reading past its declared size.

The server is trusted for nothing here: a response longer than the desired state's ``size``
is cut off and refused, a shorter one is an I/O error (retry), and the sha256 of the bytes
must equal the desired state's before the file is moved to its final name.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from edge_agent.errors import BundleError, TransportError

_CHUNK = 1 << 16


def download_bundle(
    url: str,
    dest: Path,
    partial: Path,
    *,
    size: int,
    sha256: str,
    credential: str,
    timeout_s: float,
) -> None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {credential}"})
    h = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > size:
                raise BundleError(
                    f"server offers {declared} bytes, the desired state says {size}",
                    reason="oversize",
                    bundle_sha256=sha256,
                )
            with partial.open("wb") as out:
                while received < size:
                    chunk = response.read(min(_CHUNK, size - received))
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                if received == size and response.read(1):
                    raise BundleError(
                        f"server sent more than the declared {size} bytes",
                        reason="oversize",
                        bundle_sha256=sha256,
                    )
    except urllib.error.HTTPError as e:
        partial.unlink(missing_ok=True)
        raise TransportError(
            f"bundle download failed: HTTP {e.code} {e.reason}", status=e.code
        ) from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        partial.unlink(missing_ok=True)
        raise TransportError(f"bundle download failed: {e}") from e
    except BundleError:
        partial.unlink(missing_ok=True)
        raise
    if received < size:
        partial.unlink(missing_ok=True)
        raise TransportError(f"bundle download ended after {received} of {size} bytes")
    if h.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise BundleError(
            "downloaded bundle's sha256 does not match the desired state",
            reason="digest_mismatch",
            bundle_sha256=sha256,
        )
    partial.replace(dest)
