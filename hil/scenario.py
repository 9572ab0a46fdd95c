"""A HIL scenario is data plus small step functions.

:class:`Scenario` names what it needs (device capabilities such as ``power`` or ``link``, and
fleet hooks such as ``broker_restart`` or a ``baseline`` version) and lists its steps; each step
is a plain function of a :class:`Context`. A team adds its own scenario without touching the
runner::

    from hil.scenario import Context, Scenario, register

    def restart_twice(ctx: Context) -> None:
        ctx.ensure(ctx.version)
        for device in ctx.devices:
            for _ in range(2):
                device.power_cycle()
                device.wait_ready(120)
        ctx.expect_serving(ctx.version)

    register(Scenario("restart-twice", "the candidate survives two power cycles",
                      (restart_twice,), needs=frozenset({"power"})))

and runs it with ``edgefleet hil run --scenarios-from my_scenarios.py --scenario restart-twice``
(the README's example; a test runs it from there).

The context carries the fleet (REST client), the rig's devices, the versions under test, and
the evidence: ``ctx.fail(device, why)`` marks that device's test case failed (the scenario goes
on), any exception a step raises fails every device's case with it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet_server.client import ApiClient, ApiError
from fleet_server.demo.agents import wait_until
from hil.devices.base import RigDevice

#: A deployment under way (the agent's lifecycle states between two versions).
IN_FLIGHT = frozenset(
    {"DOWNLOADING", "VERIFYING", "STAGING", "SWITCHING", "PROBATION", "ROLLING_BACK"}
)

__all__ = ["IN_FLIGHT", "SCENARIOS", "Context", "Scenario", "ScenarioError", "Step", "register"]

Step = Callable[["Context"], None]
#: The same artifact in the same runtime on another CPU: LiteRT on emulated aarch64 and on x86
#: agree to ~5e-7, not bit for bit.
SAME_ARTIFACT_ATOL = 1e-4


class ScenarioError(AssertionError):
    """A step's expectation did not hold (the message is the evidence)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    steps: tuple[Step, ...]
    #: Device capabilities (``power``, ``link``, ``shape``) and fleet needs (``broker_restart``,
    #: ``baseline``: a version of the model before the one under test).
    needs: frozenset[str] = frozenset()
    timeout_s: float = 240.0


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    SCENARIOS[scenario.name] = scenario
    return scenario


@dataclass
class Context:
    api: ApiClient
    devices: list[RigDevice]
    model: str
    version: str
    #: The version the fleet runs now (the one the candidate replaces), or None.
    baseline: str | None
    slot: str
    restart_broker: Callable[[], None] | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    reference: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    inputs: dict[str, np.ndarray] | None = None
    #: Tolerance of the predictions check, per version: ``{"max_abs_error": …}``.
    tolerance: Callable[[str, RigDevice], dict[str, float | None]] | None = None
    failures: dict[str, list[str]] = field(default_factory=dict)
    evidence: dict[str, list[str]] = field(default_factory=dict)
    #: (device id, version, milliseconds) of the predict calls the scenario made.
    latencies: list[tuple[str, str, float]] = field(default_factory=list)
    rollouts: list[str] = field(default_factory=list)
    make_bad_version: Callable[[], str] | None = None
    make_copy: Callable[[str], str] | None = None
    #: The device's own artifact run on this host in the same runtime (LiteRT on x86 for an
    #: emulated or real ARM board): (outputs, milliseconds), or None for other runtimes.
    same_artifact: (
        Callable[
            [RigDevice, dict[str, np.ndarray]], tuple[dict[str, np.ndarray], list[float]] | None
        ]
        | None
    ) = None
    #: What the device runs, in words ("litert int8 bundle 3f2a…").
    describe: Callable[[RigDevice], str] | None = None

    # --- evidence ------------------------------------------------------------------------------
    def fail(self, device: RigDevice | str, why: str) -> None:
        key = device if isinstance(device, str) else device.id
        self.failures.setdefault(key, []).append(why)

    def note(self, device: RigDevice | str, what: str) -> None:
        key = device if isinstance(device, str) else device.id
        self.evidence.setdefault(key, []).append(what)

    # --- the fleet -----------------------------------------------------------------------------
    def rollout(
        self,
        version: str,
        *,
        devices: Iterable[RigDevice] | None = None,
        wait: bool = True,
        timeout_s: float = 120,
        **extra: Any,
    ) -> dict[str, Any]:
        """Roll ``version`` out to the rig's devices (by id: rig devices are never in a
        selector's cohort); wait until it ended unless ``wait`` is False."""
        ids = [d.id for d in (devices if devices is not None else self.devices)]
        body = {"model": self.model, "version": version, "devices": ids, "slot": self.slot}
        body.update(extra)
        try:
            rollout: dict[str, Any] = self.api.post("/v1/rollouts", json=body)
        except ApiError as e:
            # An earlier rollout of this run still holds the slot (a scenario that failed
            # half-way): this one takes its devices over.
            active = [r for r in self.rollouts if self._active(r)]
            if e.status != 409 or not active:
                raise
            rollout = self.api.post("/v1/rollouts", json={**body, "supersedes": active[-1]})
        self.rollouts.append(rollout["id"])
        return self.wait_rollout(rollout["id"], timeout_s) if wait else rollout

    def _active(self, rollout_id: str) -> bool:
        state = self.api.get(f"/v1/rollouts/{rollout_id}")["state"]
        return state in ("in_progress", "paused", "awaiting_approval")

    def end_rollouts(self, grace_s: float = 30) -> None:
        """Let this scenario's rollouts end (a stage on probation), abort what is still
        running after ``grace_s`` (a step that failed half-way), and wait until no device is
        mid-deployment: the next scenario starts from a settled rig."""
        deadline = time.monotonic() + grace_s
        for rollout_id in self.rollouts:
            while self._active(rollout_id) and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._active(rollout_id):
                self.api.post(
                    f"/v1/rollouts/{rollout_id}/abort", json={"reason": "HIL scenario ended"}
                )
        for device in self.devices:
            try:
                wait_until(
                    lambda d=device: self.reported(d).get("state") not in IN_FLIGHT,  # type: ignore[misc]
                    60, f"{device.id} to settle", interval_s=0.2,
                )  # fmt: skip
            except TimeoutError as e:
                self.fail(device, str(e))

    def each(self, step: Callable[[RigDevice], None]) -> None:
        """Run ``step`` on every device at once (devices live in parallel); an exception
        fails that device's case only."""
        from concurrent.futures import ThreadPoolExecutor

        def guarded(device: RigDevice) -> None:
            try:
                step(device)
            except Exception as e:
                self.fail(device, f"{type(e).__name__}: {e}")

        with ThreadPoolExecutor(max_workers=max(1, len(self.devices))) as pool:
            list(pool.map(guarded, self.devices))

    def wait_rollout(self, rollout_id: str, timeout_s: float = 120) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            r: dict[str, Any] = self.api.get(f"/v1/rollouts/{rollout_id}")
            return r if r["state"] not in ("in_progress", "paused") else None

        return wait_until(ended, timeout_s, f"rollout {rollout_id} to end", interval_s=0.2)

    def reported(self, device: RigDevice) -> dict[str, Any]:
        """The slot as the device last reported it to the server ({} before any report)."""
        d = self.api.get(f"/v1/devices/{device.id}")
        slot: dict[str, Any] = ((d.get("reported") or {}).get("slots") or {}).get(self.slot) or {}
        return slot

    def wait_reported(
        self, device: RigDevice, states: set[str], timeout_s: float = 60
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            slot = self.reported(device)
            return slot if slot.get("state") in states else None

        return wait_until(
            probe,
            timeout_s,
            f"{device.id} to report {' or '.join(sorted(states))}",
            interval_s=0.05,
        )

    def serving(self, device: RigDevice) -> str | None:
        """The version the agent's local API serves in the slot (None: nothing, or down)."""
        try:
            for m in device.client.models():
                if m["slot"] == self.slot:
                    return str(m["version"])
        except Exception:
            return None
        return None

    def expect_serving(
        self, version: str, devices: Iterable[RigDevice] | None = None, timeout_s: float = 90
    ) -> None:
        for device in devices if devices is not None else self.devices:
            try:
                wait_until(
                    lambda d=device: self.serving(d) == version,  # type: ignore[misc]
                    timeout_s,
                    f"{device.id} to serve {version}",
                    interval_s=0.1,
                )
                self.note(device, f"serves {self.model} {version}")
            except TimeoutError as e:
                self.fail(device, f"{e} (it serves {self.serving(device)})")

    def ensure(self, version: str) -> None:
        """Every device serves ``version`` (rolled out if one does not)."""
        for _ in range(2):  # a second rollout if a device rolled the first back (noise)
            if all(self.serving(d) == version for d in self.devices):
                return
            self.rollout(version)
            self.end_rollouts()
        for device in self.devices:
            try:
                wait_until(lambda d=device: self.serving(d) == version, 60,  # type: ignore[misc]
                           f"{device.id} to serve {version}", interval_s=0.1)  # fmt: skip
            except TimeoutError:
                raise ScenarioError(
                    f"could not put {device.id} on {version} before the scenario "
                    f"(it serves {self.serving(device)})"
                ) from None

    def swap_pair(self) -> tuple[str, str]:
        """(from, to) for a scenario that needs a real swap: baseline → candidate."""
        if self.baseline is None:
            raise ScenarioError("this scenario needs a baseline version to swap from")
        return self.baseline, self.version

    def bad_version(self) -> str:
        """A version of the candidate that emits NaN (made once, on the server)."""
        assert self.make_bad_version is not None
        return self.make_bad_version()

    def fresh_copy(self, tag: str) -> str:
        """The candidate's model under a version no device has had (``V+hil.<run>.<tag>``):
        its bundle is new, so the device must download it (a scenario about the download)."""
        assert self.make_copy is not None
        return self.make_copy(tag)

    # --- predictions ---------------------------------------------------------------------------
    def _agrees(
        self,
        device: RigDevice,
        name: str,
        got: np.ndarray,
        want: np.ndarray,
        limits: dict[str, float | None],
    ) -> None:
        """Within the bundle's parity thresholds: max abs error where the precision checks
        it (fp32, fp16), else top-1 agreement over the last axis (int8)."""
        diff = float(np.max(np.abs(got.astype(np.float64) - want)))
        max_abs = limits.get("max_abs_error")
        if max_abs is not None:
            if not np.isfinite(diff) or diff > max_abs:
                self.fail(device, f"output {name!r} differs from the reference by {diff:.3g} "
                          f"(parity threshold {max_abs:g})")  # fmt: skip
            else:
                self.note(device, f"{name}: within {diff:.2g} of the reference "
                          f"(threshold {max_abs:g})")  # fmt: skip
            return
        floor = limits.get("min_top1_agreement") or 0.0
        agree = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1))) if got.ndim else 1.0
        if not np.all(np.isfinite(got)) or agree < floor:
            self.fail(device, f"output {name!r}: top-1 agreement {agree:.2f} with the reference "
                      f"(parity threshold {floor:g})")  # fmt: skip
        else:
            self.note(device, f"{name}: top-1 agreement {agree:.2f} with the reference "
                      f"(threshold {floor:g}; max abs difference {diff:.2g})")  # fmt: skip

    def check_predictions(self, version: str, samples: int = 20) -> None:
        """Every device's answers agree with the reference within the bundle's parity
        thresholds; the predict round trips are kept as latency figures."""
        assert self.inputs is not None and self.reference is not None
        want = self.reference(version, self.inputs)
        for device in self.devices:
            try:
                got = device.client.predict(self.model, self.inputs)
            except Exception as e:
                self.fail(device, f"predict failed: {e}")
                continue
            limits = self.tolerance(version, device) if self.tolerance else {}
            if self.describe is not None:
                self.note(device, f"runs {self.describe(device)}")
            for name, expected in want.items():
                self._agrees(device, name, np.asarray(got[name]), expected, limits)
            here = self.same_artifact(device, self.inputs) if self.same_artifact else None
            if here is not None:
                outputs, times = here
                self.latencies.extend(("x86 LiteRT (this host)", version, ms) for ms in times)
                for name, expected in outputs.items():
                    diff = float(np.max(np.abs(np.asarray(got[name], np.float64) - expected)))
                    if not np.isfinite(diff) or diff > SAME_ARTIFACT_ATOL:
                        self.fail(device, f"output {name!r} differs from the same artifact in "
                                  f"LiteRT on this host by {diff:.3g}")  # fmt: skip
                    else:
                        self.note(device, f"{name}: within {diff:.2g} of the same artifact in "
                                  "LiteRT on this host")  # fmt: skip
            for _ in range(samples):
                started = time.perf_counter()
                try:
                    device.client.predict(self.model, self.inputs)
                except Exception:
                    break
                self.latencies.append((device.id, version, (time.perf_counter() - started) * 1000))
