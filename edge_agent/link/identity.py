"""The device's MQTT identity: an EC key that never leaves the device and the client
certificate the fleet CA signed for it; and its renewal before the certificate expires.

Renewal (:class:`CertificateRenewer`, a thread of the agent): once less than
``[mqtt] renew_remaining`` of the certificate's lifetime is left, the agent makes a new key and
a certificate request, has the server sign it (``POST /v1/devices/{id}/certificate``, with the
device's credential), and connects to the broker with it (the link's
:meth:`~edge_agent.link.mqtt.AgentLink.switch_identity`). Only when the broker accepted that
connection do the new files take the old ones' names; until then the old key and certificate
stay where they are and the device stays connected with them. A renewal that fails anywhere
(the server, the broker, a crash) is tried again ``renew_check_s`` later. A certificate that
expired while the device was offline is renewed as soon as the agent starts: no connection can
be made with it, and the device's credential (REST) does not expire.

The files: the new pair is written beside the old as ``device.key.new`` / ``device.crt.new``,
then renamed over it key first. A crash between the two renames leaves the new key beside the
old certificate and ``device.crt.new``; :func:`recover` (at start) finishes the job, and
throws away a new pair that was never switched to.

What the running agent needs of its certificate (serial, validity) is kept beside it in
``device.crt.facts.json``, tagged with the certificate's sha256: reading it costs nothing,
where parsing the certificate loads cryptography's x509 (about 7 MiB resident for the agent's
whole life). The facts are written where cryptography is loaded anyway (enrollment, renewal)
and made again from the certificate whenever the tag does not match it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import TransportError
from edge_agent.protocol.enrollment import CertificateRenewal, CertificateRequest
from edge_agent.protocol.status import CertificateStatus

log = logging.getLogger(__name__)

__all__ = [
    "CertificateRenewer",
    "certificate_facts",
    "certificate_status",
    "new_key_and_csr",
    "recover",
    "renewal_due",
    "server_message",
]


def server_message(error: urllib.error.HTTPError) -> str:
    """What the server said in an error answer (``{"error": {"message": …}}``), else the
    status's own words: what the agent's enrollment and renewal print."""
    try:
        return str(json.loads(error.read(1 << 16))["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {error.code} {error.reason}"


def new_key_and_csr(device_id: str) -> tuple[bytes, str]:
    """A new EC P-256 key for the device's MQTT identity (PEM, PKCS#8) and a certificate
    request naming the device id. The key is written only once the server signed the
    request, and never leaves the device."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _facts_file(cert_file: Path) -> Path:
    return cert_file.with_name(cert_file.name + ".facts.json")


def _kept_facts(cert_file: Path, digest: str) -> tuple[str, datetime, datetime] | None:
    """The facts file's serial and validity when it was written for the certificate whose
    sha256 is ``digest``; None when there is none, it is another certificate's, or damaged."""
    try:
        kept = json.loads(_facts_file(cert_file).read_bytes())
        if kept["sha256"] != digest:
            return None
        return (
            str(kept["serial"]),
            datetime.fromisoformat(kept["not_before"]),
            datetime.fromisoformat(kept["not_after"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def certificate_facts(cert_file: Path) -> tuple[str, datetime, datetime]:
    """The certificate's serial (hex) and validity (not before, not after): from its facts
    file when that was written for these very bytes, else parsed (and the file written)."""
    pem = cert_file.read_bytes()
    digest = hashlib.sha256(pem).hexdigest()
    kept = _kept_facts(cert_file, digest)
    if kept is not None:
        return kept
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    serial = format(cert.serial_number, "x")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    facts = {
        "sha256": digest,
        "serial": serial,
        "not_before": start.isoformat(),
        "not_after": end.isoformat(),
    }
    try:
        write_atomic(_facts_file(cert_file), json.dumps(facts).encode())
    except OSError as e:  # a read-only state directory: parse again next time
        log.warning("cannot keep the certificate's facts beside it: %s", e)
    return serial, start, end


def certificate_status(cert_file: Path) -> CertificateStatus:
    """Serial and expiry of the certificate in ``cert_file``, for the agent's status."""
    serial, _, end = certificate_facts(cert_file)
    return CertificateStatus(serial=serial, not_after=end)


def renewal_due(cert_file: Path, remaining: float, now: datetime | None = None) -> bool:
    """Whether less than ``remaining`` (a fraction) of the certificate's lifetime is left."""
    _, start, end = certificate_facts(cert_file)
    now = now or datetime.now(UTC)
    return (end - now) < (end - start) * remaining


def expired(cert_file: Path, now: datetime | None = None) -> bool:
    return certificate_facts(cert_file)[2] <= (now or datetime.now(UTC))


def _matches(cert_pem: bytes, key_pem: bytes) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except ValueError:
        return False
    return bool(cert.public_key() == key.public_key())


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def recover(cert_file: Path, key_file: Path) -> str | None:
    """At start: finish a switch a crash interrupted, or drop a new pair never switched to.
    Returns what was done, for the log."""
    new_cert, new_key = _pending(cert_file), _pending(key_file)
    if not new_cert.exists() and not new_key.exists():
        return None
    if (
        not new_key.exists()
        and new_cert.exists()
        and _matches(new_cert.read_bytes(), key_file.read_bytes())
    ):
        os.replace(new_cert, cert_file)  # the key was renamed, the certificate not yet
        return "finished switching to the renewed certificate"
    new_cert.unlink(missing_ok=True)
    new_key.unlink(missing_ok=True)
    return "dropped a renewed certificate the broker had not accepted yet"


class CertificateRenewer:
    """Renews the certificate when due; ``switch`` connects with a new pair and says whether
    the broker accepted it (then the link runs on it)."""

    def __init__(
        self,
        *,
        device_id: str,
        server_url: str,
        credential: str,
        cert_file: Path,
        key_file: Path,
        switch: Callable[[Path, Path], bool],
        connected: Callable[[], bool],
        remaining: float,
        check_s: float,
        renewed: Callable[[], None] = lambda: None,
        timeout_s: float = 30,
    ) -> None:
        self.device_id = device_id
        self.url = f"{server_url.rstrip('/')}/v1/devices/{device_id}/certificate"
        self.credential = credential
        self.cert_file, self.key_file = cert_file, key_file
        self.switch, self.connected = switch, connected
        #: Told once the new files are in place (the agent reports the new certificate).
        self.on_renewed = renewed
        self.remaining, self.check_s, self.timeout_s = remaining, check_s, timeout_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: Renewals that ended with the new certificate in use, and attempts that did not.
        self.renewed = 0
        self.failed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-renewal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            wait = self.check_s
            try:
                # From a connected link: a switch takes the session over from a live
                # connection, never races one still coming up. Unless the certificate has
                # expired (a device back from a long time offline): then no connection can
                # come up with it, and the device's credential still gets it a new one.
                if self.connected():
                    if renewal_due(self.cert_file, self.remaining):
                        self.renew()
                elif expired(self.cert_file):
                    self.renew()
                else:
                    wait = min(self.check_s, 5.0)
            except Exception:  # a renewal must never take the agent down; next check retries
                log.exception("certificate renewal failed unexpectedly")
            self._stopping.wait(wait)

    def renew(self) -> bool:
        """One attempt: True when the device now runs on a new certificate."""
        log.info("renewing the MQTT client certificate (%s)", self.cert_file)
        key_pem, csr = new_key_and_csr(self.device_id)
        try:
            renewal = self._sign(csr)
        except TransportError as e:
            self.failed += 1
            log.warning("certificate renewal: %s; trying again in %g s", e, self.check_s)
            return False
        cert_pem = renewal.client_cert.encode()
        if not _matches(cert_pem, key_pem):
            self.failed += 1
            log.error("certificate renewal: the server's certificate is not for the new key")
            return False
        new_cert, new_key = _pending(self.cert_file), _pending(self.key_file)
        write_atomic(new_key, key_pem, mode=0o600)
        write_atomic(new_cert, cert_pem)
        if self._stopping.is_set() or not self.switch(new_cert, new_key):
            # The broker refused it (or did not answer): the old pair stays, and so does the
            # connection made with it.
            new_cert.unlink(missing_ok=True)
            new_key.unlink(missing_ok=True)
            self.failed += 1
            log.warning(
                "certificate renewal: the broker did not accept the new certificate (serial "
                "%s); staying on the old one, trying again in %g s",
                renewal.serial,
                self.check_s,
            )
            return False
        os.replace(new_key, self.key_file)  # key first: see recover()
        os.replace(new_cert, self.cert_file)
        certificate_facts(self.cert_file)  # the facts of the new one, while x509 is loaded
        self.renewed += 1
        self.on_renewed()
        log.info("renewed the MQTT client certificate: serial %s, valid until %s",
                 renewal.serial, renewal.not_after.isoformat())  # fmt: skip
        return True

    def _sign(self, csr: str) -> CertificateRenewal:
        request = urllib.request.Request(
            self.url,
            data=CertificateRequest(csr=csr).to_json(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.credential}",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                return CertificateRenewal.from_json(resp.read(1 << 20))
        except urllib.error.HTTPError as e:
            raise TransportError(
                f"the server refused to sign (HTTP {e.code}): {server_message(e)}", status=e.code
            ) from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise TransportError(f"cannot reach the server at {self.url}: {e}") from e
        except ValueError as e:  # msgspec's ValidationError and DecodeError are ValueErrors
            raise TransportError(f"the server answered with something else: {e}") from e
