"""The ``ssh`` rig kind against a real OpenSSH server (Debian's ``openssh-server``), started on
a free port with key authentication for this test: the runner builds the agent wheel, installs
``edgefleet[agent]`` on the "board" over SSH, enrolls it, runs the rollout and power-loss
scenarios through SSH forwards, and collects the agent's log. An unreachable host is one
error naming the rig and the device, exit status 2 from the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.broker import free_port
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from hil.report import write_reports
from hil.rigfile import parse_rig
from hil.runner import HilRun
from hil.sshd import LocalSshd
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_hil import _versions

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "hil" / "rigs" / "ssh.toml"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if LocalSshd.binary() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client"],
                       check=False, env=env, capture_output=True)  # fmt: skip
    if LocalSshd.binary() is None:
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    server = LocalSshd(tmp_path_factory.mktemp("sshd")).start()
    yield {"port": server.port, "key": server.key, "dir": server.dir}
    server.stop()


def _rig(sshd: dict[str, object], board: Path, port: int | None = None) -> str:
    """The shipped example, pointed at the test's sshd and a board directory of its own."""
    text = EXAMPLE.read_text()
    text = text.replace("port = 2222", f"port = {port or sshd['port']}")
    text = text.replace('"~/.ssh/edgefleet_hil"', f'"{sshd["key"]}"')
    text = text.replace('"/opt/edgefleet-hil"', f'"{board}", python = "{sys._base_executable}"')
    return text.replace('"raspberry-pi-4"', '"x86-64-avx2"')


def test_an_ssh_board_installs_enrolls_rolls_out_survives_power_loss_and_gives_its_log(
    sshd: dict[str, object],
    private_stack: EmbeddedStack,
    tmp_path: Path,
) -> None:
    api = ApiClient(private_stack.url, ADMIN_TOKEN)
    _versions(api, tmp_path)
    board = tmp_path / "board"
    rig = parse_rig(_rig(sshd, board))
    result = HilRun(
        api, private_stack.url, rig, model="clf", version="1.1.0",
        scenarios=["rollout", "power-loss"], state_dir=tmp_path / "rig", work_dir=tmp_path / "work",
    ).run()  # fmt: skip
    paths = write_reports(result, tmp_path / "out")
    failures = {(s.name, c.device): c.messages for s in result.scenarios for c in s.cases
                if c.messages}  # fmt: skip
    assert result.error is None and not failures, failures
    # Installed from the wheel built here, into a virtualenv on the board.
    assert (board / "venv" / "bin" / "edge-agent").exists()
    assert list(board.glob("edgefleet-*.whl"))
    # The log was collected over SSH into the report.
    [power] = [s for s in result.scenarios if s.name == "power-loss"]
    assert "stopped in PROBATION; settling it" in power.cases[0].log_excerpt
    assert "settling it" in paths["html"].read_text()
    # The agent is stopped at the end of the run, and the forwards are closed.
    assert not (board / "agent.pid").exists()


def test_an_unreachable_ssh_host_is_one_error_naming_the_device_and_exit_2(
    sshd: dict[str, object],
    private_stack: EmbeddedStack,
    tmp_path: Path,
) -> None:
    _versions(ApiClient(private_stack.url, ADMIN_TOKEN), tmp_path)
    rig_file = tmp_path / "rig.toml"
    rig_file.write_text(_rig(sshd, tmp_path / "board", port=free_port()))
    done = subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", "hil", "run",
         "--rig", str(rig_file), "--model", "clf", "--version", "1.0.0",
         "--out", str(tmp_path / "out"), "--server", private_stack.url],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "EDGEFLEET_TOKEN": ADMIN_TOKEN,
             "EDGEFLEET_HIL_LOCK_DIR": str(tmp_path / "locks")},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "rig 'pi-bench', device 'pi4-bench-01': host 127.0.0.1:" in line
    assert "unreachable over SSH" in line
    # The reports still say what happened: every scenario failed, none passed.
    assert 'failures="' in (tmp_path / "out" / "junit.xml").read_text()
