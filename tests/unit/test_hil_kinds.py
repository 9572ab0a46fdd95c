"""What a rig kind needs is checked before anything starts, and a missing piece is one error
naming the rig, the device and what to install or fix (no root, no tool, a wheel that cannot
be built); a worker whose rig cannot start posts a failed verdict, never a pass."""

from __future__ import annotations

import shutil
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from hil.devices import make_device
from hil.devices.qemu import Arm64Root, agent_requirements
from hil.rigfile import RigFileError, parse_rig
from hil.runner import HilRun


def _device(kind: str, reach: str = "") -> Any:
    rig = parse_rig(
        f'name = "bench"\n[[devices]]\nid = "dev-1"\nprofile = "raspberry-pi-4"\n'
        f'kind = "{kind}"\n{reach}'
    )
    return make_device(rig.name, rig.devices[0], Path("/nonexistent/dev-1"), 0)


def test_netns_without_root_names_the_rig_the_device_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(RigFileError) as e:
        _device("netns").prepare()
    assert e.value.message.startswith("rig 'bench', device 'dev-1': a netns device needs root")


@pytest.mark.parametrize(
    ("missing", "package"), [("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")]
)
def test_netns_without_its_tools_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, missing: str, package: str
) -> None:
    real = shutil.which
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda t: None if t == missing else real(t) or t)
    with pytest.raises(RigFileError) as e:
        _device("netns").prepare()
    assert f"{missing} is not installed (apt-get install {package})" in e.value.message
    assert e.value.device == "dev-1"


@pytest.mark.parametrize(
    ("missing", "package"),
    [("qemu-aarch64-static", "qemu-user-static"), ("mmdebstrap", "mmdebstrap")],
)
def test_qemu_without_its_tools_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str, package: str
) -> None:
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda t: None if t == missing else real(t) or t)
    with pytest.raises(RigFileError) as e:
        Arm64Root(tmp_path / "root", "bench", "dev-1").ensure(tmp_path / "wheel")
    assert e.value.message == (
        f"rig 'bench', device 'dev-1': {missing} is not installed (apt-get install {package})"
    )
    assert not (tmp_path / "root").exists()  # nothing was started


def test_ssh_without_a_client_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda t: None)
    with pytest.raises(RigFileError) as e:
        _device("ssh", 'reach = { host = "127.0.0.1" }').prepare()
    assert "ssh is not installed (apt-get install openssh-client)" in e.value.message


class _Api:
    """Answers the two calls a run makes before its rig starts."""

    def get(self, path: str) -> Any:
        if path.endswith("/versions/1.1.0"):
            return {"inputs": [], "outputs": []}
        return {"versions": [{"version": "1.1.0", "created_at": "2026-12-01T00:00:00Z"}]}


def test_a_rig_that_cannot_start_fails_every_scenario_and_passes_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    rig = parse_rig('name = "bench"\n[[devices]]\nid = "dev-1"\nprofile = "x86-64-avx2"\n'
                    'kind = "netns"\n')  # fmt: skip
    result = HilRun(
        _Api(), "http://127.0.0.1:9", rig, model="clf", version="1.1.0",  # type: ignore[arg-type]
        scenarios=["rollout", "bad-version"], state_dir=tmp_path / "s", work_dir=tmp_path / "w",
    ).run()  # fmt: skip
    assert not result.passed and result.config_error
    assert "needs root" in (result.error or "")
    assert [c.status for s in result.scenarios for c in s.cases] == ["failed", "failed"]


def test_a_scenario_asked_for_by_name_that_the_rig_cannot_run_is_an_error_not_a_skip(
    tmp_path: Path,
) -> None:
    rig = parse_rig('name = "bench"\n[[devices]]\nid = "dev-1"\nprofile = "x86-64-avx2"\n'
                    'kind = "local"\n')  # fmt: skip
    result = HilRun(
        _Api(), "http://127.0.0.1:9", rig, model="clf", version="1.1.0",  # type: ignore[arg-type]
        scenarios=["broker-restart"], state_dir=tmp_path / "s", work_dir=tmp_path / "w",
    ).run()  # fmt: skip
    assert result.config_error and not result.passed
    assert result.error is not None
    assert "scenario 'broker-restart' cannot run here: needs a baseline version" in result.error
    assert not (tmp_path / "s").exists()  # nothing was started


def test_the_emulated_boards_packages_are_the_agent_extras_less_onnxruntime(
    tmp_path: Path,
) -> None:
    """The arm64 root gets the agent's dependencies (cross-installed wheels) read from the
    edgefleet wheel's own metadata: what pyproject.toml names for the core and the agent and
    litert extras, less onnxruntime; none of the server's, whatever their markers."""
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    wanted = [*project["project"]["dependencies"], *extras["agent"], *extras["litert"]]
    # The wheel's METADATA as setuptools writes it, from the same pyproject.toml.
    lines = [f"Requires-Dist: {r}" for r in project["project"]["dependencies"]]
    for extra, reqs in extras.items():
        for r in reqs:
            marker = f"({r.split(';', 1)[1].strip()}) and " if ";" in r else ""
            lines.append(f'Requires-Dist: {r.split(";")[0].strip()}; {marker}extra == "{extra}"')
    wheel = tmp_path / "edgefleet-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("edgefleet-0.1.0.dist-info/METADATA", "Name: edgefleet\n" + "\n".join(lines))
    got = agent_requirements(wheel)
    assert got == sorted(
        str(Requirement(r)) for r in wanted if Requirement(r).name != "onnxruntime"
    )
    assert not [r for r in got if r.startswith(("fastapi", "sqlmodel", "boto3", "edgefleet"))]
    assert "ai-edge-litert<3,>=2.0" in got and "paho-mqtt<3,>=2.1" in got

    empty = tmp_path / "broken.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("nothing.txt", "")
    with pytest.raises(RigFileError, match=r"no \.dist-info/METADATA"):
        agent_requirements(empty)
