"""The agent's deployment path with real bundles, a real HTTP download and real onnxruntime:
success, every failure before the switch (active model untouched), and restart from disk."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.bundle.selftest import pack
from edge_agent.contracts.errors import DesiredStateError
from edge_agent.lifecycle.deployer import Deployer, DeviceContext
from edge_agent.lifecycle.journal import Journal
from edge_agent.lifecycle.probation import ProbationPolicy
from edge_agent.protocol.desired import SignedDesiredState, SlotAssignment
from edge_agent.protocol.lifecycle import SlotState as State
from edge_agent.protocol.status import Transition
from edge_agent.runtimes import LoadOptions, available_runtimes
from edge_agent.serving import SlotTable, predict
from edge_agent.trust import TrustStore
from tests.factories import TestFleet, make_bundle, read_members, resign, sha256, write_members


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class FakeClock:
    """Probation windows pass instantly; probes still run the real model."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class Device:
    """One simulated device: journal + store + slot table under a state dir."""

    def __init__(
        self, state_dir: Path, fleet: TestFleet, policy: ProbationPolicy | None = None
    ) -> None:
        from edge_agent.store.models import ModelStore

        self.clock = FakeClock()
        self.fleet = fleet
        self.state_dir = state_dir
        self.transitions: list[Transition] = []
        self.journal = Journal(state_dir / "journal.json")
        self.table = SlotTable()
        self.deployer = Deployer(
            DeviceContext(
                device_id="dev-1",
                profile="x86-64-avx2",
                runtimes=available_runtimes(),
                load_options=LoadOptions(threads=1),
                credential="efd_test",
                download_attempts=2,
                download_timeout_s=5,
            ),
            self.journal,
            ModelStore(state_dir),
            self.table,
            TrustStore(fleet.root.public_key(), state_dir / "keyring.json"),
            on_transition=self.transitions.append,
            policy=policy or ProbationPolicy(window_s=0),
            sleep=self.clock.sleep,
            clock=self.clock.now,
        )

    def apply(
        self, seq: int, slots: dict[str, SlotAssignment], *, expires_in_s: float = 3600
    ) -> SignedDesiredState:
        return self.reapply(
            self.fleet.desired("dev-1", seq, slots, expires_in=timedelta(seconds=expires_in_s))
        )

    def reapply(self, env: SignedDesiredState) -> SignedDesiredState:
        self.deployer.accept(env)
        self.deployer.converge(env.signed)
        return env

    def serving_version(self, slot: str = "clf") -> str | None:
        snap = self.table.snapshot()
        return snap[slot].ref.version if slot in snap else None


def publish(
    root: Path,
    base: str,
    bundle: Path,
    version: str,
    *,
    size: int | None = None,
    sha: str | None = None,
) -> SlotAssignment:
    target = root / bundle.name
    target.write_bytes(bundle.read_bytes())
    return SlotAssignment(
        model="classifier",
        version=version,
        bundle_sha256=sha or sha256(target),
        bundle_url=f"{base}/{bundle.name}",
        size=size or target.stat().st_size,
    )


@pytest.fixture
def fleet() -> TestFleet:
    return TestFleet()


@pytest.fixture
def v1(model_path: Path, tmp_path: Path, fleet: TestFleet) -> Path:
    out = tmp_path / "v1.efb"
    make_bundle(model_path, out, version="1.0.0", fleet=fleet)
    return out


@pytest.fixture
def v2(model_v2_path: Path, tmp_path: Path, fleet: TestFleet) -> Path:
    out = tmp_path / "v2.efb"
    make_bundle(model_v2_path, out, version="2.0.0", fleet=fleet)
    return out


def test_deploy_serves_the_model_with_onnxruntime_equal_outputs(
    files: tuple[Path, str], v1: Path, model_path: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    assert dev.serving_version() == "1.0.0"
    assert [t.to_state for t in dev.transitions] == [
        "DOWNLOADING",
        "VERIFYING",
        "STAGING",
        "SWITCHING",
        "PROBATION",
        "COMMITTED",
    ]
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    want = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
    got = predict(dev.table, "clf", {"x": x}).outputs["probs"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert dev.journal.data.slots["clf"].committed.version == "1.0.0"  # type: ignore[union-attr]


def _corrupt(bundle: Path, out: Path) -> Path:
    members = read_members(bundle)
    members = [
        (i, d[:-1] + bytes([d[-1] ^ 1]) if i.name.startswith("model/") else d) for i, d in members
    ]
    return write_members(out, members)


def _bad_selftest(bundle: Path, out: Path, fleet: TestFleet) -> Path:
    """Self-test expecting outputs the model does not produce, validly signed: only running
    the self-test can catch it."""
    wrong = pack({"x": np.ones((1, 16), np.float32)}, {"probs": np.full((1, 4), 0.25, np.float32)})
    members = [(i, wrong if i.name == "selftest.npz" else d) for i, d in read_members(bundle)]
    return write_members(out, resign(members, fleet.online))


def _unloadable(bundle: Path, out: Path, fleet: TestFleet) -> Path:
    """Validly signed, but the model file is not a model."""
    junk = b"\x08\x07garbage that is not an onnx graph" * 10
    members = [(i, junk if i.name.startswith("model/") else d) for i, d in read_members(bundle)]
    return write_members(out, resign(members, fleet.online))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("sha256 differs from the desired state", "digest_mismatch"),
        ("server sends more than the declared size", "oversize"),
        ("file damaged inside the bundle", "digest_mismatch"),
        ("self-test disagrees", "selftest_failed"),
        ("model does not load", "load_failed"),
        ("download unreachable", "transport"),
    ],
)
def test_failures_before_the_switch_leave_the_active_model_serving(
    files: tuple[Path, str],
    v1: Path,
    v2: Path,
    tmp_path: Path,
    fleet: TestFleet,
    case: str,
    reason: str,
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    if case.startswith("sha256"):
        bad = publish(root, base, v2, "2.0.0", sha="f" * 64)
    elif case.startswith("server sends"):
        bad = publish(root, base, v2, "2.0.0", size=1000)
    elif case.startswith("file damaged"):
        bad = publish(root, base, _corrupt(v2, tmp_path / "c.efb"), "2.0.0")
    elif case.startswith("self-test"):
        bad = publish(root, base, _bad_selftest(v2, tmp_path / "s.efb", fleet), "2.0.0")
    elif case.startswith("model does not"):
        bad = publish(root, base, _unloadable(v2, tmp_path / "u.efb", fleet), "2.0.0")
    else:
        bad = publish(root, base, v2, "2.0.0").replace(bundle_url="http://127.0.0.1:9/x.efb")
    dev.apply(2, {"clf": bad})
    rec = dev.journal.data.slots["clf"]
    assert rec.state == State.FAILED
    assert rec.error is not None and rec.error.reason == reason, rec.error
    assert rec.committed is not None and rec.committed.version == "1.0.0"
    assert dev.serving_version() == "1.0.0"
    assert dev.transitions[-1].to_state == "FAILED" and dev.transitions[-1].reason == reason
    # Nothing of the refused bundle stays on disk.
    assert sorted(p.name for p in (dev.state_dir / "models").iterdir()) == [sha256(v1)]
    assert list((dev.state_dir / "staging").iterdir()) == []


def test_desired_state_rules(
    files: tuple[Path, str], v1: Path, v2: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    a1, a2 = publish(root, base, v1, "1.0.0"), publish(root, base, v2, "2.0.0")
    first = dev.apply(5, {"clf": a1})
    with pytest.raises(DesiredStateError) as e:
        dev.apply(4, {"clf": a2})
    assert e.value.reason == "stale_seq"
    with pytest.raises(DesiredStateError) as e:
        dev.apply(5, {"clf": a2})
    assert e.value.reason == "replayed_seq"
    with pytest.raises(DesiredStateError) as e:
        dev.apply(6, {"clf": a2}, expires_in_s=-1)
    assert e.value.reason == "desired_state_expired"
    assert dev.serving_version() == "1.0.0" and dev.journal.data.desired_seq == 5
    dev.reapply(first)  # the same document again (retained redelivery): no change
    assert dev.serving_version() == "1.0.0"
    dev.apply(6, {"clf": a2})
    assert dev.serving_version() == "2.0.0"
    rec = dev.journal.data.slots["clf"]
    assert rec.previous is not None and rec.previous.version == "1.0.0"
    # A rollback is a newer document naming the older version; it is on disk already.
    dev.apply(7, {"clf": a1})
    assert dev.serving_version() == "1.0.0"


def test_restart_serves_the_committed_version_from_disk(
    files: tuple[Path, str], v1: Path, v2: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    # Simulate a crash in the middle of deploying v2: the journal says STAGING.
    rec = dev.journal.data.slots["clf"]
    rec.state, rec.target = State.STAGING, publish(root, base, v2, "2.0.0")
    dev.journal.save()
    (root / v1.name).unlink()  # the server is gone
    again = Device(tmp_path / "dev", fleet)
    again.deployer.restore()
    assert again.serving_version() == "1.0.0"
    rec = again.journal.data.slots["clf"]
    assert rec.state == State.FAILED and rec.error and rec.error.reason == "interrupted"
    # The redelivered document resumes the interrupted deployment.
    again.apply(2, {"clf": publish(root, base, v2, "2.0.0")})
    assert again.serving_version() == "2.0.0"


def test_a_committed_version_that_no_longer_loads_gives_way_to_the_previous(
    files: tuple[Path, str], v1: Path, v2: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    """Start-up after the last deployment failed (FAILED, committed 2.0.0, previous 1.0.0)
    and 2.0.0's files were damaged: the previous version serves, through the table."""
    import shutil

    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    a2 = publish(root, base, v2, "2.0.0")
    dev.apply(2, {"clf": a2})
    bad = publish(root, base, v2, "3.0.0", sha="f" * 64)
    dev.apply(3, {"clf": bad})
    rec = dev.journal.data.slots["clf"]
    assert rec.state == State.FAILED and rec.committed and rec.committed.version == "2.0.0"
    shutil.rmtree(dev.state_dir / "models" / a2.bundle_sha256)  # damaged on disk
    again = Device(tmp_path / "dev", fleet)
    again.deployer.restore()  # used to crash: no transition from FAILED on failure
    assert again.serving_version() == "1.0.0"
    rec = again.journal.data.slots["clf"]
    assert rec.state == State.ROLLED_BACK and rec.committed and rec.committed.version == "1.0.0"
    assert rec.error is not None and rec.error.reason == "restore_failed"


def test_garbage_collection_keeps_current_and_previous(
    files: tuple[Path, str], model_path: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    shas = []
    for i, version in enumerate(["1.0.0", "1.1.0", "1.2.0"], start=1):
        out = tmp_path / f"{version}.efb"
        make_bundle(model_path, out, version=version, fleet=fleet)
        dev.apply(i, {"clf": publish(root, base, out, version)})
        shas.append(sha256(out))
    kept = sorted(p.name for p in (dev.state_dir / "models").iterdir())
    assert kept == sorted(shas[1:])


# --- probation -----------------------------------------------------------------------------------
PROBATION = ProbationPolicy(window_s=2.0, probe_interval_s=0.05, min_latency_samples=20)


def _bundle(tmp_path: Path, fleet: TestFleet, model: Path, version: str) -> Path:
    out = tmp_path / f"{version}.efb"
    make_bundle(model, out, version=version, fleet=fleet)
    return out


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("nan", "nonfinite_outputs"), ("slow", "latency_regression")],
)
def test_probation_rolls_back_to_the_prior_version(
    files: tuple[Path, str], v1: Path, tmp_path: Path, fleet: TestFleet, bad: str, reason: str
) -> None:
    from converters.onnx.samples import nan_classifier, slow_classifier

    root, base = files
    dev = Device(tmp_path / "dev", fleet, PROBATION)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    prior = dev.table.snapshot()["clf"]
    model = (
        nan_classifier(tmp_path / "nan.onnx")
        if bad == "nan"
        else slow_classifier(tmp_path / "slow.onnx", seed=3)
    )
    dev.apply(2, {"clf": publish(root, base, _bundle(tmp_path, fleet, model, "2.0.0"), "2.0.0")})
    rec = dev.journal.data.slots["clf"]
    assert rec.state == State.ROLLED_BACK
    assert rec.error is not None and rec.error.reason == reason, rec.error
    assert [t.to_state for t in dev.transitions[-3:]] == [
        "PROBATION",
        "ROLLING_BACK",
        "ROLLED_BACK",
    ]
    assert dev.transitions[-1].reason == reason
    # The very same loaded prior serves again; its files were never touched.
    assert dev.table.snapshot()["clf"] is prior and prior.model._session is not None  # type: ignore[attr-defined]
    assert rec.committed is not None and rec.committed.version == "1.0.0"
    out = predict(dev.table, "clf", {"x": np.ones((1, 16), np.float32)}).outputs["probs"]
    assert np.isfinite(out).all()
    if reason == "latency_regression":
        assert float(rec.error.detail["ratio"]) > 2.0
    # The same document again does not retry the rolled-back version.
    dev.transitions.clear()
    dev.deployer.converge(dev.fleet.desired("dev-1", 2, {"clf": rec.target}).signed)  # type: ignore[dict-item]
    assert dev.transitions == []


def test_a_healthy_version_is_committed_after_probation_and_the_prior_closed(
    files: tuple[Path, str], v1: Path, v2: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet, PROBATION)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    prior = dev.table.snapshot()["clf"]
    dev.apply(2, {"clf": publish(root, base, v2, "2.0.0")})
    rec = dev.journal.data.slots["clf"]
    assert rec.state == State.COMMITTED and rec.committed and rec.committed.version == "2.0.0"
    assert rec.previous and rec.previous.version == "1.0.0"
    assert prior.model._session is None  # type: ignore[attr-defined]  # closed once committed
    assert dev.table.snapshot()["clf"].probe_stats.snapshot().requests >= 20


def test_a_first_version_that_fails_probation_is_not_served(
    files: tuple[Path, str], tmp_path: Path, fleet: TestFleet
) -> None:
    from converters.onnx.samples import nan_classifier

    root, base = files
    dev = Device(tmp_path / "dev", fleet, PROBATION)
    bad = _bundle(tmp_path, fleet, nan_classifier(tmp_path / "nan.onnx"), "1.0.0")
    dev.apply(1, {"clf": publish(root, base, bad, "1.0.0")})
    assert dev.journal.data.slots["clf"].state == State.ROLLED_BACK
    assert "clf" not in dev.table.snapshot()


def test_a_crash_during_probation_returns_to_the_committed_version(
    files: tuple[Path, str], v1: Path, v2: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    rec = dev.journal.data.slots["clf"]
    rec.state, rec.target = State.PROBATION, publish(root, base, v2, "2.0.0")
    dev.journal.save()
    again = Device(tmp_path / "dev", fleet)
    again.deployer.restore()
    assert again.serving_version() == "1.0.0"
    rec = again.journal.data.slots["clf"]
    assert rec.state == State.ROLLED_BACK and rec.error
    assert rec.error.reason == "interrupted_in_probation" and not rec.error.retryable


def test_a_version_rolled_back_by_a_power_cut_is_retried_by_a_new_rollout_only(
    files: tuple[Path, str], v1: Path, v2: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    # Found by the HIL power-loss scenario: after the cut rolled 2.0.0 back on probation, the
    # operator's next rollout of 2.0.0 was ignored (the agent matched the bundle alone) and
    # the server waited for the stage timeout.
    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    first = publish(root, base, v2, "2.0.0").replace(rollout_id="a" * 16)
    rec = dev.journal.data.slots["clf"]
    rec.state, rec.target = State.PROBATION, first
    dev.journal.save()
    again = Device(tmp_path / "dev", fleet)
    again.deployer.restore()
    assert again.journal.data.slots["clf"].state == State.ROLLED_BACK
    again.apply(2, {"clf": first})  # the same rollout, re-signed: not retried
    assert again.journal.data.slots["clf"].state == State.ROLLED_BACK
    assert again.serving_version() == "1.0.0"
    again.apply(3, {"clf": first.replace(rollout_id="b" * 16)})
    assert again.journal.data.slots["clf"].state == State.COMMITTED
    assert again.serving_version() == "2.0.0"


def test_a_journal_write_that_fails_mid_deployment_leaves_a_deployable_slot(
    files: tuple[Path, str], v1: Path, v2: Path, tmp_path: Path, fleet: TestFleet
) -> None:
    """The disk fills up under the journal while v2 is staged: the deployment breaks, v1
    keeps serving, and the next attempt (disk freed) goes through."""
    import errno

    root, base = files
    dev = Device(tmp_path / "dev", fleet)
    dev.apply(1, {"clf": publish(root, base, v1, "1.0.0")})
    real_save = dev.journal.save
    calls = {"n": 0}

    def save() -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # accept, DOWNLOADING, VERIFYING, then STAGING fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save()

    dev.journal.save = save  # type: ignore[method-assign]
    a2 = publish(root, base, v2, "2.0.0")
    with pytest.raises(OSError):
        dev.apply(2, {"clf": a2})
    assert dev.serving_version() == "1.0.0"
    rec = dev.journal.data.slots["clf"]
    assert rec.state == State.FAILED and rec.error and rec.error.retryable
    assert (
        Journal(tmp_path / "dev" / "journal.json", owner=False).data.slots["clf"].state
        == State.FAILED
    )
    dev.apply(3, {"clf": a2})
    assert dev.serving_version() == "2.0.0"


# --- shadow mode ---------------------------------------------------------------------------------
def test_a_shadow_runs_beside_the_active_model_and_never_answers(
    files: tuple[Path, str],
    v1: Path,
    v2: Path,
    model_path: Path,
    model_v2_path: Path,
    tmp_path: Path,
    fleet: TestFleet,
) -> None:
    root, base = files
    dev = Device(tmp_path / "dev", fleet, PROBATION)
    active = publish(root, base, v1, "1.0.0")
    dev.apply(1, {"clf": active})
    shadow = publish(root, base, v2, "2.0.0").replace(
        mode="shadow", shadow_of="clf", sample_rate=1.0
    )
    dev.apply(2, {"clf": active, "clf-shadow": shadow})
    rec = dev.journal.data.slots["clf-shadow"]
    assert rec.state == State.COMMITTED and rec.shadow_of == "clf"
    assert set(dev.table.snapshot()) == {"clf"}  # the shadow is not a served slot

    x = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    want_v1 = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
    want_v2 = ort.InferenceSession(str(model_v2_path)).run(None, {"x": x})[0]
    for _ in range(30):
        got = predict(dev.table, "clf", {"x": x})
        np.testing.assert_allclose(got.outputs["probs"], want_v1, rtol=1e-5)  # never v2's
        assert got.ref.version == "1.0.0"
    dev.table.drain_shadows()
    report = dev.table.shadow_report("clf-shadow")
    assert report is not None and report["of"] == "clf" and report["version"] == "2.0.0"
    assert report["samples"] == 30 and report["errors"] == 0
    agreement = float((want_v1.argmax(1) == want_v2.argmax(1)).mean())
    assert report["top1_agreement"] == pytest.approx(agreement)
    assert report["max_abs_diff"] == pytest.approx(float(np.abs(want_v1 - want_v2).max()), rel=1e-4)
    assert report["active_p50_ms"] > 0 and report["shadow_p50_ms"] > 0

    # After a restart the shadow is back beside the active model; removing it detaches it.
    again = Device(tmp_path / "dev", fleet, PROBATION)
    again.deployer.restore()
    assert again.table.shadow_report("clf-shadow") is not None
    again.apply(3, {"clf": active})
    assert again.table.shadow_report("clf-shadow") is None
    assert "clf-shadow" not in again.journal.data.slots


def test_shadow_assignments_must_name_their_active_slot() -> None:
    from msgspec import ValidationError

    base = {
        "model": "m",
        "version": "1.0.0",
        "bundle_sha256": "a" * 64,
        "bundle_url": "http://x",
        "size": 1,
    }
    with pytest.raises(ValidationError, match="shadow_of"):
        SlotAssignment.from_dict({**base, "mode": "shadow"})
    with pytest.raises(ValidationError, match="shadow_of"):
        SlotAssignment.from_dict({**base, "mode": "active", "shadow_of": "clf"})
    # shadow_of alone says it: mode follows, and travels on the wire for readers.
    shadow = SlotAssignment.from_dict({**base, "shadow_of": "clf"})
    assert shadow.mode == "shadow" and shadow.to_dict()["mode"] == "shadow"
    assert SlotAssignment.from_dict(shadow.to_dict()) == shadow
