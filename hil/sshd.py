"""A throwaway OpenSSH server on this host (a free loopback port, key authentication only, its
own host key and authorized key), standing in for a board's sshd in the ssh rig's tests and
benchmark. Needs Debian's ``openssh-server``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from fleet_server.broker import free_port
from hil.rigfile import RigFileError

__all__ = ["LocalSshd"]


class LocalSshd:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.key = directory / "client_key"
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("sshd") or (
            "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None
        )

    def start(self, timeout_s: float = 10) -> LocalSshd:
        exe = self.binary()
        if exe is None:
            raise RigFileError("sshd", "sshd is not installed (apt-get install openssh-server)")
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            if not (d / name).exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
                )
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        (d / "authorized_keys").chmod(0o600)
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nStrictModes no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
            f"PidFile {d / 'sshd.pid'}\nMaxStartups 50\nMaxSessions 50\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # the privilege separation directory
        log = (d / "sshd.log").open("wb")
        self._process = subprocess.Popen(
            [exe, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RigFileError(
                        "sshd", f"sshd did not start: {(d / 'sshd.log').read_text()[-300:]}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
