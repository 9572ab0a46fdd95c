"""How many worker threads a runtime gets, and whether they spin.

onnxruntime's workers spin between runs by default. On a device answering requests now and
then, each worker keeps a core busy after every run (measured: 20-39 ms of CPU per request at
50 requests/s, against 0.3-0.6 ms sleeping), and a profile's thread count above the CPUs the
agent may use makes them queue for those cores. The agent's sessions sleep unless
``[runtime] spin = true``, and take the profile's threads only up to the usable CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from converters.onnx.samples import mlp_classifier
from edge_agent.config import AgentConfig, render_config
from edge_agent.contracts.errors import ConfigError
from edge_agent.runtimes import LoadOptions, get_runtime, runtime_threads, usable_cpus


def _session_options(model: object) -> object:
    return model._session.get_session_options()  # type: ignore[attr-defined]


def test_onnxruntime_workers_sleep_between_runs_unless_asked_to_spin(tmp_path: Path) -> None:
    path = mlp_classifier(tmp_path / "m.onnx")
    runtime = get_runtime("onnxruntime")
    quiet = _session_options(runtime.load(path, LoadOptions(threads=2)))
    spinning = _session_options(runtime.load(path, LoadOptions(threads=2, spin=True)))
    key = "session.intra_op.allow_spinning"
    assert quiet.get_session_config_entry(key) == "0"  # type: ignore[attr-defined]
    assert spinning.get_session_config_entry(key) == "1"  # type: ignore[attr-defined]
    assert quiet.intra_op_num_threads == 2  # type: ignore[attr-defined]


def test_a_profiles_threads_are_capped_at_the_cpus_the_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert usable_cpus() == 2
    assert runtime_threads(0, 6) == 2  # a Jetson profile's 6, in a 2-CPU container
    assert runtime_threads(0, 1) == 1
    assert runtime_threads(8, 6) == 8  # configured by hand: as it is
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert runtime_threads(0, 4) == 4  # a Pi's 4 on a bigger machine: the profile's


def test_the_agent_config_takes_spin_and_refuses_what_is_not_a_bool(tmp_path: Path) -> None:
    (tmp_path / "device.secret").write_text("efd_x\n")
    text = render_config(
        device_id="cam-1",
        profile="x86-64-avx2",
        server_url="http://fleet:8600",
        mqtt_url="mqtt://fleet:1883",
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    assert AgentConfig.load(path).runtime.spin is False
    path.write_text(text + "\n[runtime]\nspin = true\n")
    assert AgentConfig.load(path).runtime.spin is True
    path.write_text(text + '\n[runtime]\nspin = "sometimes"\n')
    with pytest.raises(ConfigError, match="spin"):
        AgentConfig.load(path)
