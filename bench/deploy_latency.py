"""Deploy → first served prediction, on three agents (separate processes) of three profiles.

Each round uploads a new model version, creates a rollout, and polls every agent's local API
with a real prediction until it answers with the new version. Reported per round:

- api_ms:   the POST /v1/rollouts call (builds a bundle per profile, stores desired state,
            publishes over MQTT)
- first_ms: from the POST until the first agent serves the new version
- all_ms:   from the POST until all three serve it

Run: .venv/bin/python bench/deploy_latency.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.onnx.samples import mlp_classifier
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent

FLEET = [
    ("bench-x86", "x86-64-avx2"),
    ("bench-pi5", "raspberry-pi-5"),
    ("bench-orin", "jetson-orin-nano"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (model size)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    stack = EmbeddedStack(Settings(data_dir=root / "server", port=0, broker_port=0)).start()
    agents: list[LocalAgent] = []
    try:
        api = ApiClient(stack.url, stack.admin_token)
        for device_id, profile in FLEET:
            token = api.post("/v1/enrollment-tokens", json={"profile": profile})["token"]
            agent = LocalAgent(root / "devices", device_id, profile)
            agent.enroll(stack.url, token, {"ring": "bench"})
            agent.start()
            agents.append(agent)
        for agent in agents:
            agent.wait_ready()
        x = np.ones((1, 64), np.float32)
        rows = []
        for i in range(args.rounds):
            version = f"1.0.{i}"
            model = mlp_classifier(root / f"m{i}.onnx", features=64, hidden=args.hidden, seed=i)
            api.upload_model(model, "bench", version)
            t0 = time.perf_counter()
            api.post(
                "/v1/rollouts",
                json={"model": "bench", "version": version, "selector": {"ring": "bench"}},
            )
            t_api = time.perf_counter() - t0
            served: dict[str, float] = {}
            deadline = t0 + 60
            while len(served) < len(agents) and time.perf_counter() < deadline:
                for agent in agents:
                    if agent.device_id in served:
                        continue
                    try:
                        agent.client.predict("bench", {"x": x})
                        info = agent.serving("bench")
                    except Exception:
                        continue
                    if info and info["version"] == version:
                        served[agent.device_id] = time.perf_counter() - t0
                time.sleep(0.002)
            if len(served) < len(agents):
                raise SystemExit(f"round {i}: only {sorted(served)} served {version} within 60 s")
            rows.append((t_api * 1e3, min(served.values()) * 1e3, max(served.values()) * 1e3))
            api_ms, first_ms, all_ms = rows[-1]
            print(
                f"round {i}: api {api_ms:7.1f} ms  first {first_ms:7.1f} ms  all {all_ms:7.1f} ms"
            )
        size = model.stat().st_size
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        broker = stack.broker.backend if stack.broker else "external"
        print(f"model: MLP 64→{args.hidden}→4, {size / 1e3:.0f} kB ONNX; broker: {broker}")
        print(
            f"SUMMARY deploy→served on 3 agents, median of {args.rounds}: "
            f"api {med[0]:.0f} ms, first agent {med[1]:.0f} ms, all three {med[2]:.0f} ms"
        )
    finally:
        for agent in agents:
            agent.stop()
        stack.stop()


if __name__ == "__main__":
    main()
