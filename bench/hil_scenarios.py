"""Each HIL scenario's duration per rig kind, and on the emulated Raspberry Pi the int8 model's
predict latency next to the same artifact in x86 LiteRT (for the record: emulated speed says
nothing about a real board).

Runs the shipped rigs (``hil/rigs/``) against a private server and broker: ``local`` and
``netns`` (root) through every built-in scenario, ``ssh`` (a throwaway sshd on this host)
through rollout and power-loss, ``qemu-aarch64`` through the rollout of an int8 TFLite bundle.
Prints a table, a one-line summary, and one JSON line.

    python bench/hil_scenarios.py [--kinds local netns ssh qemu-aarch64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from converters.onnx.samples import mlp_classifier
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rigfile import load_rig, parse_rig
from hil.runner import HilRun, RunResult
from hil.sshd import LocalSshd

RIGS = Path(__file__).resolve().parents[1] / "hil" / "rigs"
TOKEN = "efa_bench-admin-token-0123456789abcdef0123456789"


def run_rig(kind: str, root: Path) -> RunResult:
    settings = Settings(data_dir=root / "server", port=0, broker_port=0, admin_token=TOKEN)  # type: ignore[arg-type]
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, TOKEN)
        calibration = root / "calibration.npz"
        np.savez(
            calibration, x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
        )
        for seed, version in ((1, "1.0.0"), (2, "1.1.0")):
            api.upload_model(mlp_classifier(root / f"{version}.onnx", hidden=512, seed=seed),
                             "clf", version, calibration=calibration)  # fmt: skip
        broker = stack.broker
        assert broker is not None

        def restart() -> None:
            broker.stop()
            broker.start()

        scenarios = None
        sshd = None
        if kind == "ssh":
            sshd = LocalSshd(root / "sshd").start()
            text = (RIGS / "ssh.toml").read_text()
            text = text.replace("port = 2222", f"port = {sshd.port}")
            text = text.replace('"~/.ssh/edgefleet_hil"', f'"{sshd.key}"')
            board = f'"{root / "board"}", python = "{sys._base_executable}"'
            text = text.replace('"/opt/edgefleet-hil"', board)
            rig = parse_rig(text.replace('"raspberry-pi-4"', '"x86-64-avx2"'))
            scenarios = ["rollout", "power-loss"]
        else:
            rig = load_rig(RIGS / f"{kind}.toml")
            if kind == "qemu-aarch64":
                scenarios = ["rollout"]
        try:
            result = HilRun(
                api, stack.url, rig, model="clf", version="1.1.0", scenarios=scenarios,
                state_dir=root / "rig", restart_broker=restart, work_dir=root / "work",
            ).run()  # fmt: skip
        finally:
            if sshd is not None:
                sshd.stop()
        if kind == "qemu-aarch64":
            BARE.update(bare_litert(root / "work"))
        return result


#: The bare LiteRT call on the qemu rig's artifact: {"x86": ms, "qemu-aarch64": ms}.
BARE: dict[str, float] = {}
TIMING = """
import statistics, sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1], num_threads=1)
it.allocate_tensors()
inp = it.get_input_details()[0]
it.resize_tensor_input(inp["index"], [4, 16]); it.allocate_tensors()
x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
times = []
for _ in range(200):
    t = time.perf_counter()
    it.set_tensor(inp["index"], x)
    it.invoke()
    times.append(time.perf_counter() - t)
print(statistics.median(times) * 1000)
"""


def bare_litert(work: Path) -> dict[str, float]:
    """The same .tflite, a batch of 4, one thread: LiteRT on x86 and under qemu-aarch64."""
    import subprocess

    from hil.devices.qemu import Arm64Root, default_root

    found = sorted(work.glob("bundles/*/model/*.tflite"))
    if not found:
        return {}
    arm = Arm64Root(default_root())
    out = {}
    for name, cmd, env in (
        ("x86", [sys.executable], {}),
        ("qemu-aarch64", [*arm.command("cortex-a72"), str(arm.python)],
         {"PYTHONPATH": "/opt/site", "PYTHONNOUSERSITE": "1"}),
    ):  # fmt: skip
        done = subprocess.run([*cmd, "-c", TIMING, str(found[0])], capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=600)  # fmt: skip
        if done.returncode == 0:
            out[name] = round(float(done.stdout.strip().splitlines()[-1]), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kinds", nargs="+", default=["local", "netns", "ssh", "qemu-aarch64"])
    args = parser.parse_args()
    os.environ.setdefault("EDGEFLEET_TOOLCHAIN_DIR", str(RIGS.parents[1] / ".toolchains"))
    durations: dict[str, dict[str, float]] = {}
    verdicts: dict[str, bool] = {}
    latency: dict[str, float] = {}
    for kind in args.kinds:
        if kind == "netns" and os.geteuid() != 0:
            print("netns: skipped (needs root)")
            continue
        with tempfile.TemporaryDirectory(prefix=f"hil-bench-{kind}-") as tmp:
            result = run_rig(kind, Path(tmp))
        verdicts[kind] = result.passed
        if result.error:
            print(f"{kind}: the rig could not start: {result.error}")
            continue
        durations[kind] = {s.name: round(s.duration_s, 1) for s in result.scenarios}
        if kind == "qemu-aarch64":
            by: dict[str, list[float]] = {}
            for device, _, ms in result.latencies:
                by.setdefault(device, []).append(ms)
            latency = {d: round(statistics.median(v), 3) for d, v in by.items()}
    names = sorted({n for d in durations.values() for n in d}, key=lambda n: [
        "rollout", "bad-version", "power-loss", "link-cut", "slow-link", "broker-restart",
        "tampered-bundle", "offline-stage", "power-cycles"].index(n))  # fmt: skip
    kinds = list(durations)
    print(f"\n{'scenario':16}" + "".join(f"{k:>14}" for k in kinds))
    for name in names:
        cells = "".join(
            f"{durations[k][name]:>13.1f}s" if name in durations[k] else f"{'-':>14}" for k in kinds
        )
        print(f"{name:16}{cells}")
    print(
        f"{'verdict':16}" + "".join(f"{'passed' if verdicts[k] else 'FAILED':>14}" for k in kinds)
    )
    if BARE:
        print("\nint8 TFLite, the same artifact, bare LiteRT invoke (batch 4, 1 thread), median "
              "ms: " + ", ".join(f"{k}: {v}" for k, v in BARE.items())
              + (f" ({BARE['qemu-aarch64'] / BARE['x86']:.0f}x under emulation)"
                 if len(BARE) == 2 else ""))  # fmt: skip
    if latency:
        print("\nint8 TFLite predict, median ms: "
              + ", ".join(f"{d}: {ms}" for d, ms in latency.items()))  # fmt: skip
        print("(the emulated figure is the local API round trip under qemu-user; x86 LiteRT is "
              "the bare runtime call)")  # fmt: skip
    total = {k: round(sum(v.values()), 1) for k, v in durations.items()}
    print("\nsummary: " + ", ".join(f"{k} {total[k]} s ({'passed' if verdicts[k] else 'FAILED'})"
                                    for k in kinds))  # fmt: skip
    print(json.dumps({"durations_s": durations, "passed": verdicts,
                      "qemu_int8_latency_ms": latency, "bare_litert_int8_ms": BARE}))  # fmt: skip
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
