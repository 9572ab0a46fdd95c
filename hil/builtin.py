"""The built-in scenarios, each a few steps over :class:`~hil.scenario.Context`.

Scenarios that swap versions go from the ``baseline`` (the version the fleet runs now) to the
candidate, so the faults land on the transition the fleet will make.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from edge_agent.protocol.lifecycle import SlotState
from fleet_server.demo.agents import wait_until
from hil.devices.base import Capability, RigDevice
from hil.scenario import IN_FLIGHT, Context, Scenario, ScenarioError, register

__all__ = ["BUILTIN"]

#: The agent's log line when a download continues where it stopped (``store/download.py``).
RESUMED = "resuming download at"
#: Longer than the rig agents' download timeout (5 s): a stalled TCP connection is given up
#: and the download resumes on a new one (a shorter cut is ridden out by TCP itself).
LINK_CUT_S = 8.0


def _settled_on_committed(ctx: Context, device: RigDevice, versions: set[str]) -> None:
    """The device ends serving a committed version: its slot leaves every in-flight state and
    what its local API serves is what it reports active."""

    seen: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        # Right after a restart the agent may report the rollback before the committed model
        # is loaded again (no active version yet): wait until report and API agree.
        slot = ctx.reported(device)
        serving = ctx.serving(device)
        seen.update(slot=slot, serving=serving)
        active = (slot.get("active") or {}).get("version")
        settled = slot.get("state") not in IN_FLIGHT and serving is not None
        return slot if settled and active == serving else None

    try:
        slot = wait_until(probe, 120, f"{device.id} to settle on a committed version", 0.2)
    except TimeoutError:
        slot = seen.get("slot") or {}
        active = (slot.get("active") or {}).get("version")
        ctx.fail(device, f"did not settle: serves {seen.get('serving')}, reports {active} "
                 f"({slot.get('state')})")  # fmt: skip
        return
    serving = ctx.serving(device)
    if serving not in versions:
        ctx.fail(device, f"serves {serving}; expected one of {sorted(versions)}")
    else:
        ctx.note(device, f"settled in {slot.get('state')} serving {serving}")


# --- rollout --------------------------------------------------------------------------------------
def rollout(ctx: Context) -> None:
    if ctx.baseline is not None:
        ctx.ensure(ctx.baseline)
        ctx.check_predictions(ctx.baseline)
    done = ctx.rollout(ctx.version)
    if done["state"] != "completed":
        raise ScenarioError(f"the rollout ended {done['state']}: {done.get('reason')}")
    ctx.expect_serving(ctx.version)
    ctx.check_predictions(ctx.version)


# --- bad-version ----------------------------------------------------------------------------------
def bad_version(ctx: Context) -> None:
    ctx.ensure(ctx.version)
    bad = ctx.bad_version()
    ctx.rollout(bad)
    for device in ctx.devices:
        slot = ctx.reported(device)
        if slot.get("state") != SlotState.ROLLED_BACK:
            ctx.fail(device, f"the slot is {slot.get('state')} after the NaN version; "
                     "expected ROLLED_BACK")  # fmt: skip
        elif (error := slot.get("error") or {}).get("reason"):
            ctx.note(device, f"rolled back {bad}: {error.get('reason')}: {error.get('message')}")
    ctx.expect_serving(ctx.version)


# --- power-loss -----------------------------------------------------------------------------------
def power_loss(ctx: Context) -> None:
    old, new = ctx.swap_pair()
    ctx.ensure(old)
    rollout = ctx.rollout(new, wait=False)

    def cut(device: RigDevice) -> None:
        # Mid-swap: after the switch, before the commit (the new model answers, nothing is
        # final yet).
        ctx.wait_reported(device, {SlotState.PROBATION}, 90)
        device.power_off()
        ctx.note(device, "power cut while the new version was on probation")
        time.sleep(0.5)
        device.power_on()
        device.wait_ready(120)
        _settled_on_committed(ctx, device, {old, new})

    ctx.each(cut)
    ctx.wait_rollout(rollout["id"])


# --- link-cut -------------------------------------------------------------------------------------
def link_cut(ctx: Context) -> None:
    old, _ = ctx.swap_pair()
    new = ctx.fresh_copy("link")
    ctx.ensure(old)
    logs_before = {d.id: len(d.logs()) for d in ctx.devices}
    cuts = {d.id: threading.Event() for d in ctx.devices}
    rollout: dict[str, Any] = {}
    for device in ctx.devices:
        assert device.relay is not None

        def cut(device: RigDevice = device) -> None:
            device.cut_link()  # when half the bundle has passed: mid-download, by bytes
            cuts[device.id].set()

        device.relay.on_bundle_progress = (0.5, cut)
    try:
        rollout = ctx.rollout(new, wait=False)

        def restore(device: RigDevice) -> None:
            if not cuts[device.id].wait(90):
                raise ScenarioError("the download never reached half the bundle")
            ctx.note(device, f"link cut half-way through the bundle for {LINK_CUT_S:g} s")
            time.sleep(LINK_CUT_S)
            device.restore_link()

        ctx.each(restore)
    finally:
        for device in ctx.devices:
            assert device.relay is not None
            device.relay.on_bundle_progress = None
            device.restore_link()
    ctx.expect_serving(new, timeout_s=180)
    done = ctx.wait_rollout(rollout["id"], 120)
    if done["state"] != "completed":
        raise ScenarioError(f"the rollout ended {done['state']} after the link came back")
    for device in ctx.devices:
        tail = device.logs()[logs_before[device.id] :]
        resumed = [line for line in tail.splitlines() if RESUMED in line]
        if resumed:
            ctx.note(device, resumed[0].strip())
        else:
            ctx.fail(device, "the download did not resume with Range after the link came back "
                     "(no 'resuming download' in the agent's log)")  # fmt: skip


# --- slow-link ------------------------------------------------------------------------------------
def slow_link(ctx: Context) -> None:
    old, new = ctx.swap_pair()
    ctx.ensure(old)
    cap = 96 * 1024  # the agent's own bandwidth cap (bytes/s), under the link's 1 Mbit/s
    for device in ctx.devices:
        device.set_bandwidth_cap(cap)
    try:
        for device in ctx.devices:
            device.shape_link(rate_kbit=1000, delay_ms=200, loss_pct=2.0)
            ctx.note(device, "; ".join(device.shaping) + f"; agent cap {cap} B/s")
        started = time.monotonic()
        done = ctx.rollout(new, timeout_s=240)
        if done["state"] != "completed":
            raise ScenarioError(f"the rollout ended {done['state']} on the slow link")
        for device in ctx.devices:
            ctx.note(device, f"completed on the slow link in {time.monotonic() - started:.1f} s")
    finally:
        for device in ctx.devices:
            device.unshape_link()
            device.set_bandwidth_cap(None)
    ctx.expect_serving(new)


# --- broker-restart -------------------------------------------------------------------------------
def broker_restart(ctx: Context) -> None:
    old, new = ctx.swap_pair()
    ctx.ensure(old)
    assert ctx.restart_broker is not None
    rollout = ctx.rollout(new, wait=False)
    first = ctx.devices[0]
    ctx.wait_reported(first, {*IN_FLIGHT, SlotState.COMMITTED}, 60)
    ctx.restart_broker()
    for device in ctx.devices:
        ctx.note(device, "the broker restarted mid-rollout")
    done = ctx.wait_rollout(rollout["id"], 180)
    if done["state"] != "completed":
        raise ScenarioError(f"the rollout ended {done['state']} after the broker restart")
    ctx.expect_serving(new)


# --- tampered-bundle ------------------------------------------------------------------------------
def tampered_bundle(ctx: Context) -> None:
    old, _ = ctx.swap_pair()
    new = ctx.fresh_copy("tamper")  # a bundle the device has not got: it must download it
    ctx.ensure(old)
    for device in ctx.devices:
        assert device.relay is not None
        device.relay.tamper_bundles = True
    try:
        ctx.rollout(new)
    finally:
        for device in ctx.devices:
            assert device.relay is not None
            device.relay.tamper_bundles = False
    for device in ctx.devices:
        slot = ctx.reported(device)
        error = slot.get("error") or {}
        if slot.get("state") != SlotState.FAILED or "digest" not in str(error.get("reason")):
            ctx.fail(device, f"the tampered bundle was not refused by its digest: the slot is "
                     f"{slot.get('state')} ({error.get('reason')})")  # fmt: skip
        else:
            ctx.note(device, f"refused: {error.get('reason')}: {error.get('message')}")
        if ctx.serving(device) != old:
            ctx.fail(device, f"the device changed: it serves {ctx.serving(device)}, not {old}")


# --- offline-stage --------------------------------------------------------------------------------
def offline_stage(ctx: Context) -> None:
    old, new = ctx.swap_pair()
    ctx.ensure(old)
    offline, others = ctx.devices[-1], ctx.devices[:-1]
    offline.stop()
    ctx.note(offline, "offline before the rollout began")
    rollout = ctx.rollout(new, wait=False)
    ctx.expect_serving(new, others)
    time.sleep(3.0)  # the stage runs on without it
    state = ctx.api.get(f"/v1/rollouts/{rollout['id']}")["state"]
    if state != "in_progress":
        ctx.fail(offline, f"the rollout ended {state} while the device was offline")
    offline.start()
    offline.wait_ready(120)
    ctx.note(offline, "back online")
    ctx.expect_serving(new, [offline])
    done = ctx.wait_rollout(rollout["id"], 120)
    if done["state"] != "completed":
        raise ScenarioError(f"the rollout ended {done['state']} after the device caught up")


# --- power-cycles ---------------------------------------------------------------------------------
def power_cycles(ctx: Context) -> None:
    old, new = ctx.swap_pair()
    ctx.ensure(old)
    rollout = ctx.rollout(new, wait=False)
    lock = threading.Lock()

    def cycles(device: RigDevice) -> None:
        for i in range(5):
            with lock:
                pause = ctx.rng.uniform(0.2, 1.5)
            time.sleep(pause)
            state = ctx.reported(device).get("state")
            device.power_cycle()
            ctx.note(device, f"power cycle {i + 1} at {state}")
            device.wait_ready(120)
        _settled_on_committed(ctx, device, {old, new})

    ctx.each(cycles)
    ctx.wait_rollout(rollout["id"], 180)


BUILTIN = [
    register(Scenario("rollout", "the candidate rolls out and every device's predictions "
                      "agree with the reference", (rollout,))),
    register(Scenario("bad-version", "a version that emits NaN is rolled back on the device",
                      (bad_version,))),
    register(Scenario("power-loss", "power lost mid-swap ends on a committed version serving",
                      (power_loss,), needs=frozenset({Capability.POWER, "baseline"}))),
    register(Scenario("link-cut", "a link cut mid-download resumes with Range",
                      (link_cut,), needs=frozenset({Capability.LINK, "baseline"}))),
    register(Scenario("slow-link", "1 Mbit/s, 200 ms, 2 % loss, under the agent's bandwidth "
                      "cap: still completes", (slow_link,),
                      needs=frozenset({Capability.SHAPE, "baseline"}))),
    register(Scenario("broker-restart", "the broker restarts mid-rollout; it completes",
                      (broker_restart,), needs=frozenset({"broker_restart", "baseline"}))),
    register(Scenario("tampered-bundle", "a bundle changed in transit is refused; the device "
                      "is unchanged", (tampered_bundle,), needs=frozenset({"baseline"}))),
    register(Scenario("offline-stage", "a device offline through a whole stage catches up",
                      (offline_stage,), needs=frozenset({"baseline"}))),
    register(Scenario("power-cycles", "five power cycles in a row mid-rollout end on a "
                      "committed version", (power_cycles,),
                      needs=frozenset({Capability.POWER, "baseline"}))),
]  # fmt: skip
