"""Enrolling a pallet of devices: N single-use tokens in one request, then N enrollments.

A real ``edgefleet serve`` (SQLite, or ``--database-url``) and a private Mosquitto; the tokens
come from one ``POST /v1/enrollment-tokens/batch`` and each device trades its own at
``POST /v1/devices/enroll`` (``--workers`` of them at a time, as devices arriving together
do), with a certificate request (``--csr``: every device asks for an mTLS client certificate,
as the agent does on an mTLS broker) or without (password-auth brokers). Beside it, in the
same run, the HTTP floor: the same number of ``GET /healthz`` from the same client threads
(what any request costs on this machine). Reported: wall time, devices a second, the ratio
to the floor, and the server's CPU seconds.

Target (issue 23): 10,000 devices well under a minute on the 2-core dev machine.

``--password-file``: a password-auth broker's setup: the server writes the broker's password
file (``EDGEFLEET_BROKER_PASSWORD_FILE``) for each new device and sends the broker SIGHUP
(``EDGEFLEET_BROKER_RELOAD_COMMAND``); enrollments that arrive together share those writes.
Also printed: how many writes and reloads there were.

Run: .venv/bin/python bench/enrollment.py [--devices 10000] [--workers 8] [--csr]
     [--password-file] [--database-url postgresql://…]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.served import cpu_s, start_serve
from fleet_server.broker import EmbeddedBroker
from fleet_server.client import ApiClient

TOKEN = "efa_bench-enroll-token-0123456789abcdef0123456789"


def _csrs(n: int) -> list[str]:
    """One key and CSR per device, made before the clock starts (a device makes its own)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"e-{i:05d}")]))
            .sign(key, hashes.SHA256())
        )
        out.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--csr", action="store_true")
    parser.add_argument("--password-file", action="store_true")
    parser.add_argument("--database-url")
    args = parser.parse_args()
    n = args.devices

    work = Path(tempfile.mkdtemp(prefix="ef-enroll-"))
    broker = EmbeddedBroker(work / "broker", backend="mosquitto").start()
    settings = {"EDGEFLEET_DATA_DIR": str(work / "server"), "EDGEFLEET_MQTT_URL": broker.url}
    if args.database_url:
        settings["EDGEFLEET_DATABASE_URL"] = args.database_url
    reloads = work / "reloads"
    if args.password_file:
        assert broker._process is not None  # mosquitto, a process of its own
        settings["EDGEFLEET_BROKER_PASSWORD_FILE"] = str(work / "passwords")
        settings["EDGEFLEET_BROKER_RELOAD_COMMAND"] = (
            f"sh -c 'kill -HUP {broker._process.pid} && echo reload >> {reloads}'"
        )
    try:
        server, api = start_serve(settings, TOKEN, work / "server.log")
    except BaseException:
        broker.stop()
        raise
    try:
        csrs = _csrs(n) if args.csr else [None] * n
        clients = [ApiClient(api.base_url, None, timeout_s=300) for _ in range(args.workers)]

        def floor(i: int) -> Any:
            return clients[i % args.workers].get("/healthz")

        cpu = cpu_s(server.pid)
        t = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(floor, range(n)))
        floor_s = time.perf_counter() - t
        floor_cpu = cpu_s(server.pid) - cpu

        cpu, own = cpu_s(server.pid), time.process_time()
        t = time.perf_counter()
        tokens = api.post(
            "/v1/enrollment-tokens/batch",
            json={"count": n, "profile": "x86-64-avx2", "labels": {"fleet": "bench"}},
        )["tokens"]
        tokens_s = time.perf_counter() - t

        def enroll(i: int) -> Any:
            body: dict[str, Any] = {
                "token": tokens[i], "device_id": f"e-{i:05d}", "profile": "x86-64-avx2",
            }  # fmt: skip
            if csrs[i] is not None:
                body["csr"] = csrs[i]
            return clients[i % args.workers].post("/v1/devices/enroll", json=body)

        with ThreadPoolExecutor(args.workers) as pool:
            replies = list(pool.map(enroll, range(n)))
        enroll_s = time.perf_counter() - t
        enroll_cpu = cpu_s(server.pid) - cpu
        client_cpu = time.process_time() - own
        assert len({r["device_id"] for r in replies}) == n
        assert all((r["client_cert"] is not None) == args.csr for r in replies)
        if args.password_file:
            listed = (work / "passwords").read_text().splitlines()
            assert len(listed) == n, len(listed)  # every device in the broker's file
            reloaded = len(reloads.read_text().splitlines())
    finally:
        server.terminate()
        server.wait(30)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    engine = "PostgreSQL" if args.database_url else "SQLite"
    kind = "with a CSR each" if args.csr else "no CSR"
    if args.password_file:
        kind += ", password file"
    print(f"{n} devices on {engine}, {args.workers} client threads, {kind}")
    print(f"tokens (one request):    {tokens_s:7.2f} s")
    print(
        f"tokens + enrollments:    {enroll_s:7.2f} s = {n / enroll_s:,.0f} devices/s, "
        f"server CPU {enroll_cpu:.1f} s ({enroll_cpu / n * 1000:.2f} ms a device), "
        f"the clients' {client_cpu:.1f} s"
    )
    if args.password_file:
        print(f"password file writes:    {reloaded} (and as many broker reloads) for {n}")
    print(
        f"HTTP floor (/healthz):   {floor_s:7.2f} s = {n / floor_s:,.0f} requests/s, "
        f"server CPU {floor_cpu:.1f} s ({floor_cpu / n * 1000:.2f} ms a request)"
    )
    print(
        f"SUMMARY enrollment of {n} devices on {engine} ({kind}): {enroll_s:.1f} s "
        f"({enroll_s / floor_s:.1f}x the HTTP floor of the same number of requests)"
    )


if __name__ == "__main__":
    main()
