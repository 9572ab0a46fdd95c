"""The agent process's own health: CPU share, resident memory, and the board's temperature.

Read from the OS without extra dependencies: ``os.times()`` for CPU, ``/proc/self/statm`` for
RSS, ``/sys/class/thermal/thermal_zone*/temp`` (millidegrees) for temperature. Where the OS
exposes none of these, the figure is absent, never invented.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from edge_agent.protocol.telemetry import ProcessFigures

__all__ = ["ProcessSampler"]


class ProcessSampler:
    def __init__(self, thermal_root: Path = Path("/sys/class/thermal")) -> None:
        self._thermal_root = thermal_root
        self._last = self._cpu_and_wall()

    @staticmethod
    def _cpu_and_wall() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def sample(self) -> ProcessFigures:
        """CPU since the previous sample (100 = one core busy), RSS and temperature now."""
        cpu, wall = self._cpu_and_wall()
        last_cpu, last_wall = self._last
        self._last = (cpu, wall)
        elapsed = wall - last_wall
        return ProcessFigures(
            cpu_percent=round(100 * (cpu - last_cpu) / elapsed, 2) if elapsed > 0 else None,
            rss_bytes=_rss_bytes(),
            temperature_c=self.temperature_c(),
        )

    def temperature_c(self) -> float | None:
        """The hottest thermal zone, in °C; None where the OS exposes none."""
        readings = []
        for zone in sorted(self._thermal_root.glob("thermal_zone*/temp")):
            try:
                readings.append(int(zone.read_text().strip()) / 1000)
            except (OSError, ValueError):
                continue
        plausible = [r for r in readings if -100 <= r <= 300]
        return max(plausible) if plausible else None


def _rss_bytes() -> int | None:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
