"""Rig files: the shipped examples load; every mistake is one error naming the rig, the device
and the field; the CLI exits 2 on it and starts nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hil.lease import RigBusy, RigLock
from hil.rigfile import RigFileError, load_rig, parse_rig

RIGS = Path(__file__).resolve().parents[2] / "hil" / "rigs"

GOOD = """
name = "bench"
[[devices]]
id = "pi-01"
profile = "raspberry-pi-4"
kind = "ssh"
labels = { site = "lab" }
power_cycle = "plug cycle 3"
reach = { host = "127.0.0.1", port = 2222, user = "pi" }
"""


@pytest.mark.parametrize("path", sorted(RIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_rig_file_loads(path: Path) -> None:
    rig = load_rig(path)
    assert rig.devices and rig.name


def test_a_good_rig_file() -> None:
    rig = parse_rig(GOOD)
    [device] = rig.devices
    assert (device.id, device.kind, device.profile) == ("pi-01", "ssh", "raspberry-pi-4")
    assert device.reach["port"] == 2222 and device.reach["python"] == "python3"
    assert device.power.power_cycle == "plug cycle 3" and device.power.power_off is None
    assert device.labels == {"site": "lab"}


@pytest.mark.parametrize(
    ("text", "device", "words"),
    [
        (GOOD.replace('kind = "ssh"', 'kind = "usb"'), "pi-01", "unknown kind 'usb'"),
        (GOOD.replace('profile = "raspberry-pi-4"\n', ""), "pi-01", "profile"),
        (GOOD.replace('"raspberry-pi-4"', '"raspberry-pi-9"'), "pi-01", "raspberry-pi-9"),
        (GOOD.replace('host = "127.0.0.1", ', ""), "pi-01", "reach.host: a ssh device needs it"),
        (GOOD.replace("port = 2222", 'port = "22"'), "pi-01", "reach.port: expected int"),
        (GOOD.replace("port = 2222", "prot = 22"), "pi-01", "reach.prot: unknown field"),
        (GOOD.replace('power_cycle = "plug cycle 3"', "power_cycle = 3"), "pi-01", "power_cycle"),
        (GOOD.replace('labels = { site = "lab" }', "labels = { site = 1 }"), "pi-01", "labels"),
        (GOOD.replace('id = "pi-01"', 'id = "Pi 01"'), None, "devices[0].id"),
        (GOOD + GOOD.split("\n", 2)[2], "pi-01", "duplicate device id"),
        (GOOD.replace('name = "bench"', ""), None, "name"),
        (GOOD.replace("[[devices]]", "[[device]]"), None, "device: unknown field"),
        ('name = "bench"\n', None, "at least one [[devices]]"),
        ("name = [", None, "not valid TOML"),
    ],
)
def test_mistakes_name_the_rig_the_device_and_the_field(
    text: str, device: str | None, words: str
) -> None:
    with pytest.raises(RigFileError) as e:
        parse_rig(text)
    assert words in e.value.message
    assert e.value.device == device
    if device:
        assert f"device {device!r}" in e.value.message


def test_the_cli_refuses_a_bad_rig_file_with_exit_2_and_one_line(tmp_path: Path) -> None:
    rig = tmp_path / "bad.toml"
    rig.write_text(GOOD.replace('kind = "ssh"', 'kind = "usb"'))
    done = subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", "hil", "run", "--rig", str(rig),
         "--model", "m", "--version", "1.0.0", "--out", str(tmp_path / "out"),
         "--server", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "rig 'bench', device 'pi-01': kind: unknown kind" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_second_run_fails_at_once_naming_who_holds_the_rig(tmp_path: Path) -> None:
    held = RigLock("bench", "edgefleet hil run classifier 1.1.0", tmp_path).acquire()
    try:
        with pytest.raises(RigBusy) as e:
            RigLock("bench", "another", tmp_path).acquire(wait=False)
        assert "held by edgefleet hil run classifier 1.1.0" in e.value.message
        assert f"pid {os.getpid()}" in e.value.message
        # With a server that answers nothing: the lock is checked before anything else.
        rig = tmp_path / "bench.toml"
        rig.write_text(GOOD)
        done = subprocess.run(
            [sys.executable, "-c", "from fleet_server.cli import main; main()", "hil", "run", "--rig", str(rig),
             "--model", "m", "--version", "1.0.0", "--out", str(tmp_path / "out"), "--no-wait",
             "--server", "http://127.0.0.1:9"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "EDGEFLEET_HIL_LOCK_DIR": str(tmp_path)},
        )  # fmt: skip
        assert done.returncode == 1
        assert "rig 'bench' is held by edgefleet hil run classifier 1.1.0" in done.stderr
    finally:
        held.release()
    RigLock("bench", "after", tmp_path).acquire(wait=False).release()
