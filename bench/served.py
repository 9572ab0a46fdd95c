"""A real ``edgefleet serve`` in a process of its own, as benchmarks run it (shared by them):
started with ``EDGEFLEET_*`` settings, waited for, and read from outside (``/proc``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fleet_server.broker import free_port
from fleet_server.client import ApiClient

__all__ = ["TICKS", "cpu_s", "start_serve", "status_mib"]

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of the process from ``/proc/PID/status`` (``VmRSS``, ``VmHWM``…), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(f"{field} is not in /proc/{pid}/status")


def start_serve(
    settings: dict[str, str], token: str, log_path: Path, *, timeout_s: float = 60,
    client_timeout_s: float = 300,
) -> tuple[subprocess.Popen[bytes], ApiClient]:  # fmt: skip
    """``edgefleet serve`` on a free port with ``settings`` (and ``token`` as its admin
    token), its output in ``log_path``; returns once ``/healthz`` answers. A server that does
    not start is stopped and its log's tail printed."""
    port = free_port()
    env = {**os.environ, **settings, "EDGEFLEET_ADMIN_TOKEN": token, "EDGEFLEET_PORT": str(port)}
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", "from fleet_server.cli import main; main()", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = ApiClient(f"http://127.0.0.1:{port}", token, timeout_s=client_timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            api.get("/healthz")
            return server, api
        except Exception as e:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                server.wait(30)
                print(log_path.read_text(errors="replace")[-2000:])
                raise SystemExit("the server did not start") from e
            time.sleep(0.2)
