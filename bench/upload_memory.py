"""What a large model upload costs the server's memory, measured from outside.

A real ``edgefleet serve`` process (SQLite, embedded broker, no ingest processes) is started;
an ONNX model of ``--mb`` megabytes (one MatMul whose weight is that large, plus a small
calibration set) is uploaded through the CLI's client. The server process's resident memory is
read from ``/proc`` (``VmRSS`` idle and after, ``VmHWM``: its peak since it started) and the
upload's wall time is reported beside the raw rate of copying the same file on this disk,
since an absolute time belongs to the machine. The model is inspected (onnx.load and
onnx.checker, the calibration set checked against its inputs) in a child process whose peak
the server logs and the summary prints: that memory is the host's for a moment, not the
server's for good.

Target (issue 23): the server's peak within ~64 MiB of idle, whatever the model's size.

``--s3``: the artifact store is an S3 bucket (moto's server, a process of its own) instead of
the data directory: the upload is spooled, checked, then sent as a multipart upload.

Run: .venv/bin/python bench/upload_memory.py [--mb 300] [--s3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.served import start_serve, status_mib
from fleet_server.broker import free_port

TOKEN = "efa_bench-upload-token-0123456789abcdef0123456789"


def big_model(path: Path, mb: int) -> None:
    """y = x @ W, W float32 [k, k] with k² · 4 bytes ≈ ``mb`` MB (inline, not external)."""
    from onnx import TensorProto, helper, numpy_helper

    k = int((mb * 1024 * 1024 / 4) ** 0.5)
    weight = np.random.default_rng(0).standard_normal((k, k), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    del model, weight
    np.savez(path.with_suffix(".npz"), x=np.zeros((4, k), np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--s3", action="store_true", help="an S3 artifact store (moto)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ef-upload-"))
    try:
        model = work / "big.onnx"
        big_model(model, args.mb)
        size_mib = model.stat().st_size / 2**20
        started = time.perf_counter()
        shutil.copyfile(model, work / "copy.onnx")
        with open(work / "copy.onnx", "rb+") as f:
            os.fsync(f.fileno())
        copy_s = time.perf_counter() - started
        (work / "copy.onnx").unlink()

        store: dict[str, str] = {}
        s3 = None
        if args.s3:
            from tests.objectstore import MotoServer

            s3 = MotoServer(work).start()
            store = {**s3.env(), "EDGEFLEET_ARTIFACTS_URL": f"s3://{s3.new_bucket()}/bench"}
        server, api = start_serve(
            {
                "EDGEFLEET_DATA_DIR": str(work / "server"),
                "EDGEFLEET_BROKER_PORT": str(free_port()),
                "EDGEFLEET_INGEST_PROCESSES": "0",
                **store,
            },
            TOKEN,
            work / "server.log",
            client_timeout_s=600,
        )
        try:
            time.sleep(2)  # the engine's and control plane's first steps
            idle = status_mib(server.pid, "VmRSS")
            idle_peak = status_mib(server.pid, "VmHWM")
            started = time.perf_counter()
            version = api.upload_model(model, "big", "1.0.0", calibration=model.with_suffix(".npz"))
            upload_s = time.perf_counter() - started
            after = status_mib(server.pid, "VmRSS")
            peak = status_mib(server.pid, "VmHWM")
            assert version["size"] == model.stat().st_size
        finally:
            server.terminate()
            server.wait(30)
            if s3 is not None:
                s3.stop()
        child = re.findall(r"inspected .* peak (\d+) MiB", (work / "server.log").read_text())

        where = "an S3 bucket (moto)" if args.s3 else "the data directory"
        print(f"model: {size_mib:.0f} MiB ONNX (inline weights) + a small calibration set")
        print(f"artifact store:        {where}")
        print(f"server RSS idle:       {idle:7.0f} MiB (peak before the upload {idle_peak:.0f})")
        print(f"server RSS after:      {after:7.0f} MiB")
        print(f"server peak (VmHWM):   {peak:7.0f} MiB  (+{peak - idle:.0f} MiB over idle)")
        if child:
            print(f"inspector child peak:  {int(child[-1]):7d} MiB  (exits after the check)")
        print(
            f"upload wall time:      {upload_s:7.2f} s  "
            f"(copying the file on this disk: {copy_s:.2f} s, x{upload_s / copy_s:.1f})"
        )
        verdict = "within" if peak - idle <= 64 else "over"
        print(
            f"SUMMARY upload of {size_mib:.0f} MiB to {where}: server peak "
            f"+{peak - idle:.0f} MiB over idle ({verdict} the 64 MiB target), "
            f"after +{after - idle:.0f} MiB, "
            f"{upload_s:.1f} s (x{upload_s / copy_s:.1f} a plain copy)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
