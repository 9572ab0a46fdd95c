"""The broker's files that follow the database: the certificate revocation list (Mosquitto's
``crlfile``), the ACL (``acl_file``: a deny-all block per decommissioned device) and, on a
password-auth broker, the password file.

Each is written whole from the database, atomically, and the broker is then told to reread
them by the configured command. Measured on Mosquitto 2.0.11: SIGHUP rereads the CRL (a revoked
certificate's next connect fails its TLS handshake) but leaves a connection that is already
up alone; the ACL, reread at the same time, cuts that connection off (its publishes are
refused, nothing is delivered to it). So a decommissioned device gets both.

A CRL has a ``nextUpdate``; past it OpenSSL refuses every client. Ours runs to the fleet CA's
own expiry, and is signed again whenever it is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import ConfigError, TransportError
from fleet_server.auth.broker_acl import acl_text
from fleet_server.auth.ca import FleetCA
from fleet_server.auth.mqtt_passwords import password_file_text
from fleet_server.devices.tables import Device, DeviceCertificate
from fleet_server.settings import Settings

log = logging.getLogger(__name__)

#: How long the reload command may take.
RELOAD_TIMEOUT_S = 30.0
#: How long a grouped write waits for the callers about to join it.
LINGER_S = 0.01


@dataclass(frozen=True)
class BrokerFiles:
    crl_file: Path | None = None
    acl_file: Path | None = None
    password_file: Path | None = None
    reload_command: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> BrokerFiles:
        return cls(
            settings.broker_crl_file,
            settings.broker_acl_file,
            settings.broker_password_file,
            settings.broker_reload_command,
        )

    @property
    def configured(self) -> bool:
        return any((self.crl_file, self.acl_file, self.password_file))

    def contents(self, session: Session, ca: FleetCA) -> dict[Path, bytes]:
        """Each configured file's text as the database (in ``session``'s transaction) has it."""
        out: dict[Path, bytes] = {}
        if self.crl_file is not None:
            serials = session.exec(
                select(DeviceCertificate.serial).where(
                    col(DeviceCertificate.revoked_at).is_not(None)
                )
            ).all()
            out[self.crl_file] = _crl(self.crl_file, ca, sorted(serials))
        if self.acl_file is not None:
            denied = session.exec(
                select(Device.id)
                .where(col(Device.decommissioned_at).is_not(None))
                .order_by(col(Device.id))
            ).all()
            out[self.acl_file] = acl_text(list(denied)).encode()
        if self.password_file is not None:
            out[self.password_file] = password_file_text(session, self.password_file).encode()
        return out

    def write(self, contents: dict[Path, bytes]) -> list[Path]:
        """Write each file that differs (atomically, keeping its mode and group: the broker
        reads them as its own user); returns those written."""
        written = []
        for path, data in contents.items():
            if path.is_file() and path.read_bytes() == data:
                continue
            mode, group = 0o640, None
            if path.exists():
                info = path.stat()
                mode, group = info.st_mode & 0o777, info.st_gid
            write_atomic(path, data, mode=mode)
            if group is not None and path.stat().st_gid != group:
                # The broker reads them through this group (broker-config set it); a server
                # that is not root keeps it if its user belongs to the group.
                with contextlib.suppress(PermissionError):
                    os.chown(path, -1, group)
            written.append(path)
        return written

    def sync(self, session: Session, ca: FleetCA) -> tuple[list[Path], TransportError | None]:
        """Write each file from the database (``session``'s transaction) and, when one
        changed, reload the broker: (files written, the reload's failure if it failed). An
        :class:`OSError` writing a file is raised."""
        written = self.write(self.contents(session, ca)) if self.configured else []
        if not written:
            return written, None
        try:
            self.reload()
        except TransportError as e:
            return written, e
        return written, None

    def reload(self) -> None:
        """Run the reload command; :class:`TransportError` naming it when it fails."""
        if not self.reload_command:
            return
        try:
            done = subprocess.run(
                shlex.split(self.reload_command),
                capture_output=True,
                text=True,
                timeout=RELOAD_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TransportError(
                f"the broker reload command {self.reload_command!r} failed: {e}"
            ) from e
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise TransportError(
                f"the broker reload command {self.reload_command!r} exited {done.returncode}"
                + (f": {last[0][:200]}" if last[0] else "")
            )


class GroupedWrites:
    """The broker's files written for many requests at once (group commit): a pallet of
    devices enrolling on a password-auth broker would otherwise rewrite the whole password
    file, and reload the broker, once per device.

    :meth:`write` is called after the caller's transaction committed, and returns once a
    write that read the database after that commit is done (so the caller's change is in the
    files and the broker was told, as before). While one write is under way, the callers that
    arrive wait for it and then share the next one: one write covers them all."""

    def __init__(self, engine: Engine, ca: FleetCA, files: BrokerFiles) -> None:
        self.engine, self.ca, self.files = engine, ca, files
        self._cond = threading.Condition()
        self._requested = 0  # callers so far, numbered
        self._done = 0  # callers whose change a finished write covered
        self._writing = False
        #: Each finished write's outcome, by the last caller it covered, kept until every
        #: caller it covered has read it.
        self._results: dict[int, tuple[list[Path], TransportError | None, BaseException | None]]
        self._results = {}
        self._waiting: set[int] = set()
        #: Writes done, those that changed a file (and so reloaded the broker), and the
        #: callers they covered (for the benchmark and tests). A write whose read found the
        #: files already current (an earlier write read this caller's commit too) changes
        #: nothing and does not reload.
        self.writes = 0
        self.changed = 0
        self.covered = 0

    def write(self) -> tuple[list[Path], TransportError | None]:
        """(files written, the reload's failure if it failed) for the write that covered this
        caller. An :class:`OSError` writing the files is raised to every caller it covered."""
        with self._cond:
            self._requested += 1
            mine = self._requested
            self._waiting.add(mine)
            while self._done < mine:
                if self._writing:
                    self._cond.wait()
                    continue
                self._writing = True
                # Enrollments under way now commit within a few milliseconds: waiting that
                # long lets this write cover them too, instead of the next.
                self._cond.wait(LINGER_S)
                upto = self._requested
                self._cond.release()
                error: BaseException | None = None
                outcome: tuple[list[Path], TransportError | None] = ([], None)
                try:
                    outcome = self._write_now()
                except BaseException as e:  # handed to every caller this write covered
                    error = e
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self.writes += 1
                    self.changed += bool(outcome[0])
                    self.covered += upto - self._done
                    self._done = upto
                    self._results[upto] = (*outcome, error)
                    self._cond.notify_all()
            written, reload_error, error = self._results[min(k for k in self._results if k >= mine)]
            self._waiting.discard(mine)
            oldest = min(self._waiting, default=self._requested + 1)
            for covered in [k for k in self._results if k < oldest]:
                del self._results[covered]
            if error is not None:
                raise error
            return written, reload_error

    def _write_now(self) -> tuple[list[Path], TransportError | None]:
        with Session(self.engine) as session:
            return self.files.sync(session, self.ca)


def _crl(path: Path, ca: FleetCA, serials: list[str]) -> bytes:
    """The CRL naming ``serials``: the file as it is when it already names exactly them and is
    signed by this CA (a CRL is signed anew each time, so an equal one is never byte-equal)."""
    if path.is_file():
        try:
            current = x509.load_pem_x509_crl(path.read_bytes())
        except ValueError:
            current = None
        if (
            current is not None
            and current.issuer == ca.cert.subject
            and current.is_signature_valid(ca.key.public_key())
            and {r.serial_number for r in current} == {int(s, 16) for s in serials}
        ):
            return path.read_bytes()
    return revocation_list(ca, serials)


def revocation_list(ca: FleetCA, serials: list[str]) -> bytes:
    """A CRL signed by the fleet CA naming ``serials`` (hex), valid until the CA expires."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(ca.cert.not_valid_after_utc)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(now)
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def sync_at_start(engine: Engine, ca: FleetCA, files: BrokerFiles) -> list[Path]:
    """Bring the broker's files in line with the database when the server starts (a crash
    between a commit and a reload, an operator who restored a backup) and reload the broker
    when one changed. A file the server cannot write stops the start, naming it."""
    if not files.configured:
        return []
    try:
        with Session(engine) as session:
            written, reload_error = files.sync(session, ca)
    except OSError as e:
        raise ConfigError(
            f"cannot write the broker's files ({e}): fix the path or its permissions "
            "(EDGEFLEET_BROKER_CRL_FILE, _ACL_FILE, _PASSWORD_FILE)"
        ) from e
    if reload_error is not None:
        log.warning("%s; the broker still reads its old files", reload_error.message)
    return written


def revoked_serials(path: Path) -> set[int]:
    """The serials a CRL file names (empty when there is no file)."""
    if not path.is_file():
        return set()
    return {r.serial_number for r in x509.load_pem_x509_crl(path.read_bytes())}
