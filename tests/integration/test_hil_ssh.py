"""The ``ssh`` rig kind against a real OpenSSH server (Debian's ``openssh-server``), started on
a free port with key authentication for this test: the runner builds the agent wheel, installs
``edgefleet[agent]`` on the "board" over SSH, enrolls it, runs the rollout and power-loss
scenarios through SSH forwards, and collects the agent's log. An unreachable host is one
error naming the rig and the device, exit status 2 from the CLI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.broker import free_port
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from hil.report import write_reports
from hil.rigfile import parse_rig
from hil.runner import HilRun
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_hil import _versions

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "hil" / "rigs" / "ssh.toml"


def _sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client"],
                       check=False, env=env, capture_output=True)  # fmt: skip
        found = "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None
    if found is None:
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    return found


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    exe = _sshd_binary()
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)  # fmt: skip
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nStrictModes no\nUsePAM no\n"
        f"PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nPidFile {d / 'sshd.pid'}\n"
        "MaxStartups 50\nMaxSessions 50\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # the privilege separation directory
    process = subprocess.Popen([exe, "-D", "-e", "-f", str(d / "sshd_config")],
                               stdout=subprocess.DEVNULL, stderr=(d / "sshd.log").open("wb"))  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.05)
    yield {"port": port, "key": d / "client_key", "dir": d}
    process.terminate()
    process.wait(10)


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
