"""``qemu-aarch64`` rig devices: the real agent, with the real aarch64 LiteRT wheel, run by
``qemu-aarch64-static`` (user-mode emulation of a Cortex-A72, a Raspberry Pi 4's core) in an
arm64 Debian root.

The root is made once and cached (:class:`Arm64Root`, default ``.toolchains/arm64-root``):
``mmdebstrap --variant=extract`` of bookworm's ``python3`` and ``libstdc++6`` from Debian's
packages, the aarch64 wheels of the agent's dependencies cross-installed from here with
``pip --platform manylinux_2_27_aarch64`` (LiteRT 2.x is tagged 2_27) into ``/opt/site``, and
the edgefleet wheel built from this checkout into ``/opt/edgefleet``. The root has a Raspberry
Pi 4 ``/proc/cpuinfo`` (LiteRT and onnxruntime crash on an x86 host's) and an ``/etc/hosts``.
Emulated processes reach this host's loopback, so the device is a ``local`` one with another
interpreter: power cut by ``kill -9``, link through the relay. Emulated speed says nothing
about a real board.
"""

from __future__ import annotations

import email.parser
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hil.devices.local import LocalDevice
from hil.devices.ssh import agent_wheel
from hil.rigfile import DeviceSpec, RigFileError

__all__ = ["Arm64Root", "QemuDevice", "agent_requirements"]

#: The extras an ARM board's agent installs (onnxruntime, the agent extra's x86 runtime, left
#: out: LiteRT runs the board's .tflite bundles), and the board the markers are read for.
AGENT_EXTRAS = ("agent", "litert")
LEFT_OUT = frozenset({"onnxruntime"})
_BOARD = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "aarch64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "python_full_version": "3.11.2",
}
PLATFORMS = ("manylinux_2_27_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")  # fmt: skip
RPI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Revision\t: c03114
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def default_root() -> Path:
    base = os.environ.get("EDGEFLEET_TOOLCHAIN_DIR")
    return (Path(base) if base else Path.cwd() / ".toolchains") / "arm64-root"


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    if os.environ.get("EDGEFLEET_DEBIAN_MIRROR"):
        return os.environ["EDGEFLEET_DEBIAN_MIRROR"]
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def agent_requirements(wheel: Path) -> list[str]:
    """What an ARM board's agent needs, read from the edgefleet wheel it will run: the core
    dependencies and those of :data:`AGENT_EXTRAS`, their markers read for a 64-bit ARM
    Linux board, less :data:`LEFT_OUT`. Sorted, markers dropped (pip is told the platform)."""
    with zipfile.ZipFile(wheel) as zf:
        name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            raise RigFileError("qemu", f"{wheel.name} has no .dist-info/METADATA")
        metadata = email.parser.BytesParser().parsebytes(zf.read(name))
    wanted: set[str] = set()
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if canonicalize_name(req.name) in LEFT_OUT:
            continue
        if req.marker is not None and not any(
            req.marker.evaluate({**_BOARD, "extra": extra}) for extra in ("", *AGENT_EXTRAS)
        ):
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        wanted.add(f"{req.name}{extras}{req.specifier}")
    return sorted(wanted)


class Arm64Root:
    def __init__(self, root: Path, rig: str = "qemu", device: str | None = None) -> None:
        self.root = root
        self.rig, self.device = rig, device

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / "python3.11"

    def check_tools(self) -> str:
        for tool, package in (("qemu-aarch64-static", "qemu-user-static"),
                              ("mmdebstrap", "mmdebstrap")):  # fmt: skip
            if shutil.which(tool) is None:
                raise RigFileError(self.rig, f"{tool} is not installed (apt-get install "
                                   f"{package})", device=self.device)  # fmt: skip
        return str(shutil.which("qemu-aarch64-static"))

    def ensure(self, wheel_dir: Path) -> None:
        """Make (or bring up to date) the root; safe when several runs race for it."""
        self.check_tools()
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with (self.root.parent / f"{self.root.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.python.exists():
                self._debootstrap()
            wheel = agent_wheel(wheel_dir)
            self._site(agent_requirements(wheel))
            self._edgefleet(wheel)

    def _run(self, what: str, cmd: list[str], timeout_s: float = 900) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RigFileError(self.rig, f"{what} failed: {' '.join(tail)}", device=self.device)

    def _debootstrap(self) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="arm64-root-", dir=self.root.parent))
        try:
            target = scratch / "root"
            self._run("mmdebstrap (the arm64 Debian root)", [
                "mmdebstrap", "--arch=arm64", "--variant=extract",
                "--include=python3,libstdc++6", "bookworm", str(target), _mirror(),
            ])  # fmt: skip
            (target / "proc").mkdir(exist_ok=True)
            (target / "proc" / "cpuinfo").write_text(RPI4_CPUINFO)
            (target / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
            shutil.rmtree(self.root, ignore_errors=True)
            os.replace(target, self.root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _site(self, requirements: list[str]) -> None:
        stamp = self.root / "opt" / "site.requirements"
        wanted = "\n".join(requirements)
        if stamp.exists() and stamp.read_text() == wanted:
            return
        site = self.root / "opt" / "site"
        shutil.rmtree(site, ignore_errors=True)
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        self._run("pip (the aarch64 wheels)", [
            sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
            "--target", str(site), "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", *platforms, *requirements,
        ])  # fmt: skip
        stamp.write_text(wanted)

    def _edgefleet(self, wheel: Path) -> None:
        stamp = self.root / "opt" / "edgefleet.sha256"
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest:
            return
        target = self.root / "opt" / "edgefleet"
        shutil.rmtree(target, ignore_errors=True)
        self._run("pip (the edgefleet wheel)", [
            sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
            "--no-deps", "--target", str(target), str(wheel),
        ])  # fmt: skip
        stamp.write_text(digest)

    def command(self, cpu: str) -> tuple[str, ...]:
        return (str(shutil.which("qemu-aarch64-static")), "-cpu", cpu, "-L", str(self.root))

    @staticmethod
    def env() -> dict[str, str]:
        # Paths inside the root: qemu looks below -L first.
        return {"PYTHONPATH": "/opt/edgefleet:/opt/site", "PYTHONNOUSERSITE": "1",
                "PYTHONHOME": "", "VIRTUAL_ENV": ""}  # fmt: skip


class QemuDevice(LocalDevice):
    def __init__(self, rig: str, spec: DeviceSpec, state_dir: Path) -> None:
        root = Path(spec.reach["root"]).expanduser() if spec.reach.get("root") else default_root()
        self.arm = Arm64Root(root, rig, spec.id)
        env = Arm64Root.env()
        env.pop("PYTHONHOME")  # an empty PYTHONHOME is not "unset": leave it out
        super().__init__(
            rig, spec, state_dir,
            command_prefix=self.arm.command(spec.reach.get("cpu") or "cortex-a72"),
            python=str(self.arm.python),
            env=env,
        )  # fmt: skip

    def prepare(self) -> None:
        self.arm.ensure(self.state_dir.parent / "wheel")
        # The prefix was made before the tools were checked: make it again with their path.
        self.agent.command_prefix = self.arm.command(self.spec.reach.get("cpu") or "cortex-a72")
        probe = ("import platform; from edge_agent.runtimes.registry import available_runtimes; "
                 "print(platform.machine(), available_runtimes())")  # fmt: skip
        done = subprocess.run(
            [*self.agent.command_prefix, str(self.arm.python), "-c", probe],
            capture_output=True, text=True, timeout=180, check=False,
            env={**os.environ, **self.agent.env},
        )  # fmt: skip
        if done.returncode != 0:
            raise RigFileError(self.rig, "the emulated Python does not start: "
                               f"{done.stderr.strip()[-300:]}", device=self.id)  # fmt: skip
        machine, _, runtimes = done.stdout.strip().partition(" ")
        self.facts = [f"platform {machine} (qemu-user, -cpu {self.agent.command_prefix[2]})",
                      f"runtimes {runtimes}"]  # fmt: skip
        super().prepare()

    def wait_ready(self, timeout_s: float = 60) -> None:
        super().wait_ready(max(timeout_s, 180))  # an emulated start-up takes a while
