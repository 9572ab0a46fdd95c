"""A fleet downloading a bundle from an S3 artifact store: through the server, or straight from
the store by presigned URLs, side by side in one run.

A real S3-protocol server (moto's, a process of its own) holds the artifacts. For each mode a
real ``edgefleet serve`` (SQLite, embedded broker, ``EDGEFLEET_ARTIFACTS_URL=s3://…``) is
started, a model of ``--mb`` megabytes uploaded and rolled out to ``--devices`` enrolled
devices; then every device downloads its bundle at once with the agent's own download code
(``edge_agent.store.download.download_bundle``: urllib, following the server's redirect in
presigned mode), from a client process of its own, one thread per device.

Figures per mode: wall time for the whole fleet, aggregate throughput, and the CPU seconds
the server process and the store process spent on it. moto is a Python server, far slower
than S3 or MinIO: its CPU shows where the bytes went, not what a real store costs.

Run: .venv/bin/python bench/artifact_downloads.py [--devices 100] [--mb 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.served import cpu_s, start_serve
from bench.upload_memory import big_model
from fleet_server.broker import free_port
from tests.objectstore import MotoServer

TOKEN = "efa_bench-artifacts-token-0123456789abcdef0123456789"

#: The client process: every device downloads at once, one thread each.
CLIENT = r"""
import json, shutil, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from edge_agent.store.download import download_bundle
job = json.load(sys.stdin)
work = Path(tempfile.mkdtemp(prefix="ef-dl-"))
def one(i):
    dest, part = work / f"{i}.efb", work / f"{i}.part"
    t = time.perf_counter()
    download_bundle(job["url"], dest, part, size=job["size"], sha256=job["sha256"],
                    credential=job["secrets"][i], timeout_s=300)
    dest.unlink()
    return time.perf_counter() - t
t = time.perf_counter()
with ThreadPoolExecutor(len(job["secrets"])) as pool:
    each = list(pool.map(one, range(len(job["secrets"]))))
print(json.dumps({"wall_s": time.perf_counter() - t, "each_s": sorted(each)}))
shutil.rmtree(work, ignore_errors=True)
"""


def run_mode(
    mode: str, s3: MotoServer, bucket: str, model: Path, devices: int, work: Path
) -> dict[str, Any]:
    server, api = start_serve(
        {
            **s3.env(),
            "EDGEFLEET_DATA_DIR": str(work / mode),
            "EDGEFLEET_BROKER_PORT": str(free_port()),
            "EDGEFLEET_INGEST_PROCESSES": "0",
            "EDGEFLEET_ARTIFACTS_URL": f"s3://{bucket}/{mode}",
            "EDGEFLEET_BUNDLE_DOWNLOADS": mode,
        },
        TOKEN,
        work / f"{mode}.log",
        client_timeout_s=600,
    )
    try:
        api.upload_model(model, "big", "1.0.0")
        tokens = api.post(
            "/v1/enrollment-tokens/batch", json={"count": devices, "profile": "x86-64-avx2"}
        )["tokens"]
        ids = [f"dl-{i:03d}" for i in range(devices)]
        secrets = [
            api.post(
                "/v1/devices/enroll",
                json={"token": token, "device_id": device, "profile": "x86-64-avx2"},
            )["device_secret"]
            for token, device in zip(tokens, ids, strict=True)
        ]
        rollout = api.post(
            "/v1/rollouts", json={"model": "big", "version": "1.0.0", "devices": ids}
        )
        deadline = time.monotonic() + 600
        while True:  # every device notified of the bundle (so allowed to fetch it)
            current = api.get(f"/v1/rollouts/{rollout['id']}")
            if current["stages"][0]["counts"]["notified"] == devices:
                sha = current["targets"][0]["bundle_sha256"]
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the rollout did not notify its devices: {current['counts']}")
            time.sleep(0.5)
        size = api.get(f"/v1/bundles/{sha}/info")["size"]
        job = {
            "url": f"{api.base_url}/v1/bundles/{sha}",
            "size": size,
            "sha256": sha,
            "secrets": secrets,
        }
        server_cpu, store_cpu = cpu_s(server.pid), cpu_s(s3.pid)
        done = subprocess.run(
            [sys.executable, "-c", CLIENT],
            input=json.dumps(job),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"{mode}: the downloads failed: {done.stderr[-1500:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        result.update(
            mode=mode,
            size=size,
            server_cpu_s=cpu_s(server.pid) - server_cpu,
            store_cpu_s=cpu_s(s3.pid) - store_cpu,
        )
        return result
    finally:
        server.terminate()
        server.wait(30)
        errors = [
            line
            for line in (work / f"{mode}.log").read_text(errors="replace").splitlines()
            if "Error" in line or "Traceback" in line
        ]
        if errors:
            print(f"{mode}: the server logged {len(errors)} error line(s), the first: {errors[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--mb", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the logs and the store's")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ef-artifacts-"))
    try:
        model = work / "big.onnx"
        big_model(model, args.mb)
        with MotoServer(work) as s3:
            bucket = s3.new_bucket()
            results = [
                run_mode(mode, s3, bucket, model, args.devices, work)
                for mode in ("server", "presigned")
            ]
        for r in results:
            total_mb = r["size"] * args.devices / 1e6
            each = r["each_s"]
            print(
                f"{r['mode']:>9}: {args.devices} devices x {r['size'] / 1e6:.1f} MB in "
                f"{r['wall_s']:6.2f} s = {total_mb / r['wall_s']:7.1f} MB/s; one device "
                f"median {each[len(each) // 2]:.2f} s, slowest {each[-1]:.2f} s; CPU: server "
                f"{r['server_cpu_s']:6.2f} s, store {r['store_cpu_s']:6.2f} s"
            )
        through, direct = results
        print(
            f"SUMMARY {args.devices} devices x {through['size'] / 1e6:.1f} MB: through the "
            f"server {through['wall_s']:.1f} s and {through['server_cpu_s']:.1f} server CPU-s; "
            f"presigned {direct['wall_s']:.1f} s and {direct['server_cpu_s']:.2f} server CPU-s "
            f"(x{through['server_cpu_s'] / max(direct['server_cpu_s'], 0.01):.0f} less server "
            f"CPU; wall time x{direct['wall_s'] / through['wall_s']:.2f} the server path's)"
        )
    finally:
        if "--keep" not in sys.argv:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
