"""The agent's own footprint over the runtime it serves with, side by side in one run.

For each of two devices — x86 (onnxruntime) and a Raspberry Pi 4 profile (its int8 TFLite
bundle, run with LiteRT on this host) — a real ``edge-agent`` process is enrolled with an
embedded server, a small MLP is rolled out to it, and once it serves and has sat idle its
resident memory (``VmRSS``) is read from ``/proc``. Beside it, a bare process imports the same
runtime, loads the same model file (the bundle's, extracted) and runs it once, then reports its
own ``VmRSS``. Also timed: the agent's start-up, from ``edge-agent run`` to its first answer
with the committed model (a restart, as after a power cut). And where an agent's memory goes:
the resident memory of a fresh interpreter after importing each part of what the agent loads.

Target (issue 24): idle RSS ≤ 16 MiB above the bare process; start-up ≤ 1 s.

Run: .venv/bin/python bench/agent_footprint.py
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.served import status_mib
from converters.onnx.samples import mlp_classifier
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, roll_out

DEVICES = [("fp-x86", "x86-64-avx2"), ("fp-pi4", "raspberry-pi-4")]

BARE = r"""
import sys, time
path, runtime = sys.argv[1], sys.argv[2]
import numpy as np
x = np.ones((1, 64), np.float32)
if runtime == "onnxruntime":
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: x})
else:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], x.astype(d["dtype"]) if d["dtype"] == np.float32 else
                  np.zeros(d["shape"], d["dtype"]))
    it.invoke()
time.sleep(1.0)
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""

#: What an agent loads, part by part, over the runtime: each line imports everything above it
#: too, in a fresh interpreter, and its figure is what it adds.
PARTS = [
    ("python", ""),
    ("numpy", "import numpy"),
    ("onnxruntime (the bare process's)", "import onnxruntime"),
    ("msgspec (every message, manifest and config)", "import msgspec"),
    ("paho-mqtt (ssl with it)", "import paho.mqtt.client"),
    ("pynacl: ed25519 (bundle and document signatures)", "import nacl.signing"),
    ("ddsketch, tomli-w, packaging", "import ddsketch, tomli_w, packaging.specifiers"),
    ("edge_agent.agent (the rest: its code, http.server)", "import edge_agent.agent"),
    ("cryptography: x509 (mTLS devices only)", "import cryptography.x509"),
    ("prometheus-client (at the first /metrics scrape)", "import prometheus_client"),
]  # fmt: skip


def _import_rss(statement: str) -> float:
    code = f"{statement}\nprint(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1]) / 1024


def _model_file(agent: LocalAgent) -> tuple[Path, str]:
    """The served bundle's model file, extracted, and its runtime."""
    bundles = sorted((agent.dir / "state").rglob("*.efb"))
    assert bundles, f"no bundle under {agent.dir}"
    out = agent.dir / "bare"
    out.mkdir(exist_ok=True)
    with tarfile.open(bundles[-1]) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("model/") and m.isfile())
        tar.extract(member, out, filter="data")
    path = out / member.name
    return path, "litert" if path.suffix == ".tflite" else "onnxruntime"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="ef-footprint-"))
    stack = EmbeddedStack(Settings(data_dir=root / "server", port=0, broker_port=0)).start()
    agents: list[LocalAgent] = []
    try:
        api = ApiClient(stack.url, stack.admin_token)
        api.upload_model(mlp_classifier(root / "m.onnx", features=64, seed=1), "small", "1.0.0")
        for device_id, profile in DEVICES:
            token = api.post("/v1/enrollment-tokens", json={"profile": profile})["token"]
            agent = LocalAgent(root / "devices", device_id, profile)
            agent.enroll(stack.url, token)
            agent.start()
            agents.append(agent)
        for agent in agents:
            agent.wait_ready()
        done = roll_out(api, "small", "1.0.0", [a.device_id for a in agents], timeout_s=300)
        assert done["state"] == "completed", done
        x = np.ones((1, 64), np.float32)
        rows = []
        for agent in agents:
            agent.client.predict("small", {"x": x})
            time.sleep(3)  # idle
            assert agent.process is not None
            agent_rss = status_mib(agent.process.pid)
            path, runtime = _model_file(agent)
            bare = subprocess.run(
                [sys.executable, "-c", BARE, str(path), runtime],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            bare_rss = int(bare.stdout.split()[-1]) / 1024
            starts = []
            for _ in range(3):
                agent.stop()
                t = time.perf_counter()
                agent.start()
                while True:
                    try:
                        agent.client.predict("small", {"x": x})
                        break
                    except Exception:
                        time.sleep(0.01)
                starts.append(time.perf_counter() - t)
            rows.append((agent.profile, runtime, agent_rss, bare_rss, statistics.median(starts)))
        print("resident memory a fresh interpreter adds with each part (and all above it):")
        done, last = [], 0.0
        for name, statement in PARTS:
            done.append(statement)
            rss = _import_rss("\n".join(s for s in done if s))
            print(f"  {name:52s} {rss:6.1f} MiB ({rss - last:+5.1f})")
            last = rss
        for profile, runtime, agent_rss, bare_rss, start in rows:
            print(
                f"{profile} ({runtime}): agent idle {agent_rss:.1f} MiB, bare process "
                f"{bare_rss:.1f} MiB (+{agent_rss - bare_rss:.1f} MiB); start-up to the first "
                f"answer {start:.2f} s (median of 3)"
            )
        summary = "; ".join(
            f"{p} +{a - b:.1f} MiB over bare ({a:.1f} vs {b:.1f}), start-up {s:.2f} s"
            for p, _, a, b, s in rows
        )
        print(f"SUMMARY agent footprint: {summary} (targets: +16 MiB, 1 s)")
    finally:
        for agent in agents:
            agent.stop()
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
