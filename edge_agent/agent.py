"""The agent daemon: restores what it served, listens for desired state, deploys, reports.

Threads: paho's network loop; one deployment worker (deployments run one at a time, and only
the newest pending desired-state document is kept — an older one would be refused anyway);
the HTTP server's request threads. The main thread waits for a stop signal.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.config import AgentConfig, StreamConfig
from edge_agent.contracts.errors import ConfigError, EdgefleetError
from edge_agent.lifecycle.deployer import Deployer, DeviceContext
from edge_agent.lifecycle.journal import Journal
from edge_agent.link.identity import CertificateRenewer, certificate_status, recover
from edge_agent.link.mqtt import AgentLink
from edge_agent.protocol.desired import SignedDesiredState
from edge_agent.protocol.status import (
    CertificateStatus,
    Refusal,
    ReportedStatus,
    SlotStatus,
    Transition,
)
from edge_agent.runtimes import LoadOptions, available_runtimes, runtime_threads
from edge_agent.serving import (
    FeedbackStore,
    InferenceHTTPServer,
    InferenceUnixServer,
    SlotTable,
    start_http,
    start_unix,
)
from edge_agent.store.models import ModelStore
from edge_agent.telemetry.outbox import Outbox, OutboxLimits
from edge_agent.telemetry.reporter import (
    OutboxCollector,
    TelemetryReporter,
    TelemetrySettings,
)
from edge_agent.trust import TrustStore
from firmware_profiles import default_catalog

if TYPE_CHECKING:
    from edge_agent.serving.stream import Stream, StreamSpec

log = logging.getLogger(__name__)


def _stream_spec(config: StreamConfig) -> StreamSpec:
    from edge_agent.serving.stream import StreamSpec

    password = _read_secret(config.password_file) if config.password_file else None
    return StreamSpec(
        name=config.stream_name,
        slot=config.slot,
        input=config.input,
        output=config.output,
        queue=config.queue,
        qos=config.qos,
        username=config.username,
        password=password,
    )


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.profile = default_catalog().get(config.profile)
        credential = config.read_credential()
        runtimes = available_runtimes()
        providers: tuple[str, ...] = ()
        for spec in self.profile.runtimes:
            if spec.name == "onnxruntime":
                providers = tuple(spec.providers)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.table = SlotTable()
        if config.feedback.enabled:
            f = config.feedback
            self.table.feedback = FeedbackStore(
                capacity=f.capacity, max_age_s=f.max_age_s, max_labels_per_s=f.max_labels_per_s
            )
        self.journal = Journal(config.state_dir / "journal.json")
        self.telemetry: TelemetryReporter | None = None
        if config.telemetry.enabled:
            t = config.telemetry
            self.telemetry = TelemetryReporter(
                config.device_id,
                Outbox(
                    config.state_dir / "telemetry",
                    OutboxLimits(max_bytes=t.outbox_max_bytes, max_age_s=t.outbox_max_age_s),
                ),
                TelemetrySettings(
                    interval_s=t.interval_s,
                    checkpoint_s=t.checkpoint_s,
                    resend_after_s=t.resend_after_s,
                    budget=t.budget,
                    min_sample_rate=t.min_sample_rate,
                ),
                publish=self._publish_telemetry,
                rollout_of=self._rollout_of,
                labels=self.table.feedback,
            )
            self.table.on_serving = self.telemetry.track
            if self.table.feedback is not None:
                self.table.feedback.persist = self.telemetry.persist
            self.table.collectors.append(OutboxCollector(self.telemetry.outbox))
        self.store = ModelStore(config.state_dir)
        self.deployer = Deployer(
            DeviceContext(
                device_id=config.device_id,
                profile=config.profile,
                runtimes=runtimes,
                load_options=LoadOptions(
                    threads=runtime_threads(config.runtime.threads, self.profile.resources.threads),
                    spin=config.runtime.spin,
                    providers=providers,
                    cache_dir=config.state_dir / "engine-cache",
                ),
                credential=credential,
                download_attempts=config.download.attempts,
                download_timeout_s=config.download.timeout_s,
                download_max_bytes_per_s=config.download.max_bytes_per_s,
                download_mirror_url=config.download.mirror_url,
                download_reserve_bytes=config.download.reserve_bytes,
            ),
            self.journal,
            self.store,
            self.table,
            TrustStore.from_files(config.trust.root_key_file, config.state_dir / "keyring.json"),
            on_transition=self._transitioned,
            policy=config.probation,
        )
        mqtt = config.mqtt
        self.renewer: CertificateRenewer | None = None
        if mqtt.url.startswith("mqtts://") and mqtt.cert_file and mqtt.key_file:
            done = recover(mqtt.cert_file, mqtt.key_file)  # before the link reads them
            if done:
                log.warning("client certificate: %s", done)
        self.link = AgentLink(
            config.device_id,
            config.mqtt,
            on_desired=self._desired_arrived,
            on_connected=self._connected,
            on_ack=self.telemetry.acknowledged if self.telemetry else lambda payload: None,
            password=_read_secret(config.mqtt.password_file) if config.mqtt.password_file else None,
        )
        if mqtt.url.startswith("mqtts://") and mqtt.cert_file and mqtt.key_file:
            self.renewer = CertificateRenewer(
                device_id=config.device_id,
                server_url=config.server.url,
                credential=credential,
                cert_file=mqtt.cert_file,
                key_file=mqtt.key_file,
                switch=self.link.switch_identity,
                connected=self.link.connected.is_set,
                remaining=mqtt.renew_remaining,
                check_s=mqtt.renew_check_s,
                renewed=self.publish_status,
            )
        self.runtimes = runtimes
        self._cert_cache: tuple[int, CertificateStatus] | None = None
        self._last_transition: Transition | None = None
        self._refusal: Refusal | None = None
        #: The newest document that arrived, parsed (or why it could not be).
        self._pending: SignedDesiredState | EdgefleetError | None = None
        self._wakeup = threading.Condition()
        self._stopping = threading.Event()
        self._status_lock = threading.Lock()
        self.http: InferenceHTTPServer | None = None
        self.unix: InferenceUnixServer | None = None
        self.streams: list[Stream] = []
        if config.streams:  # the stream module only where streams are configured
            from edge_agent.serving.stream import Stream, StreamCollector

            self.streams = [Stream(_stream_spec(s), self.table) for s in config.streams]
            self.table.collectors.append(StreamCollector(self.streams))
        self._worker: threading.Thread | None = None

    # --- lifecycle of the daemon -----------------------------------------------------------------
    def start(self) -> None:
        self.deployer.restore()
        self.http, _ = start_http(self.table, self.config.serving.host, self.config.serving.port)
        log.info("serving on http://%s:%d", self.config.serving.host, self.http.port)
        if self.config.serving.unix_socket is not None:
            self.unix = start_unix(self.table, self.config.serving.unix_socket)
            log.info("serving on unix://%s", self.config.serving.unix_socket)
        for stream in self.streams:
            stream.start()
        self._worker = threading.Thread(target=self._work, name="edge-agent-deploy", daemon=True)
        self._worker.start()
        if self.telemetry is not None:
            self.telemetry.start()
        self.link.start()
        if self.renewer is not None:
            self.renewer.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.renewer is not None:
            self.renewer.stop()
        with self._wakeup:
            self._wakeup.notify_all()
        if self.telemetry is not None:
            # The interval so far becomes a batch; sent now if the link is up, else next run.
            self.telemetry.stop()
            self.telemetry.send_pending()
        self.link.stop()
        if self._worker is not None:
            self._worker.join(timeout=30)
        for stream in self.streams:  # each answers what it has queued, then stops
            stream.stop()
        for server in (self.http, self.unix):
            if server is not None:
                server.shutdown()
                server.server_close()
        self.table.close()

    def wait(self) -> None:
        self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    def _connected(self) -> None:
        self.publish_status()
        if self.telemetry is not None:
            self.telemetry.connected()

    def _publish_telemetry(self, payload: bytes) -> bool:
        return self.link.publish_telemetry(payload)

    def _rollout_of(self, slot: str, version: str) -> str | None:
        """The rollout that brought ``version`` to ``slot`` (the one deploying it, or the one
        that brought the committed or previous version), if the journal still says so."""
        rec = self.journal.data.slots.get(slot)
        if rec is None:
            return None
        if rec.target is not None and rec.target.version == version:
            return rec.target.rollout_id
        if rec.committed is not None and rec.committed.version == version:
            return rec.committed_rollout_id
        if rec.previous is not None and rec.previous.version == version:
            return rec.previous_rollout_id
        return None

    # --- desired state ---------------------------------------------------------------------------
    def _desired_arrived(self, payload: bytes) -> None:
        """On the MQTT thread: keep the newest document for the worker, and if it takes the
        slot under deployment elsewhere, end that deployment now (probation would otherwise
        hold the worker for its whole window). The payload is parsed here, once: the worker
        gets the document, or the refusal to report."""
        try:
            envelope: SignedDesiredState | EdgefleetError = SignedDesiredState.from_bytes(payload)
        except EdgefleetError as e:
            envelope = e
        with self._wakeup:
            self._pending = envelope
            self._wakeup.notify_all()
        if isinstance(envelope, EdgefleetError):
            return
        try:
            self.deployer.supersede(envelope)
        except Exception:  # never let a document stop the network loop
            log.exception("checking whether a desired state supersedes the deployment failed")

    def _work(self) -> None:
        interval = self.config.reporting.status_interval_s
        next_report = time.monotonic() + interval
        while not self._stopping.is_set():
            with self._wakeup:
                while self._pending is None and not self._stopping.is_set():
                    if not self._wakeup.wait(timeout=max(0.0, next_report - time.monotonic())):
                        break
                pending, self._pending = self._pending, None
            try:
                if pending is not None:
                    self._apply(pending)
                elif time.monotonic() >= next_report and self.link.connected.is_set():
                    # Figures that change without a transition (shadow comparisons) reach the
                    # server at least this often.
                    self.publish_status()
            except Exception as e:  # the worker outlives any one document: it keeps listening
                log.exception("the deployment worker failed on a desired state; still listening")
                self._report_failure(e)
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + interval

    def _apply(self, envelope: SignedDesiredState | EdgefleetError) -> None:
        if isinstance(envelope, EdgefleetError):  # not a document at all
            self._refuse(envelope, None)
            return
        try:
            self.deployer.accept(envelope)
        except EdgefleetError as e:
            self._refuse(e, envelope.signed.seq)
            return
        self._refusal = None
        try:
            self.deployer.converge(envelope.signed)
        except Exception:  # a bug must not kill the worker thread; the model keeps serving
            log.exception("deployment crashed")
        self.publish_status()

    def _report_failure(self, error: Exception) -> None:
        """An unexpected failure is reported like a refusal (nothing was applied), so the
        fleet sees it; reporting must not fail the worker in turn."""
        self._refusal = Refusal(reason="agent_error", message=f"{type(error).__name__}: {error}")
        try:
            self.publish_status()
        except Exception:
            log.exception("could not report the failure")

    def _refuse(self, error: EdgefleetError, seq: int | None) -> None:
        """Nothing changes on the device; the reason goes to the server."""
        log.error("refused desired state%s: %s", f" seq {seq}" if seq else "", error.message)
        self._refusal = Refusal(reason=error.reason, message=error.message, seq=seq)
        self.publish_status()

    # --- reporting -------------------------------------------------------------------------------
    def _transitioned(self, transition: Transition) -> None:
        self._last_transition = transition
        self.publish_status()

    def status(self) -> ReportedStatus:
        serving = self.table.snapshot()
        slots = {}
        for name, rec in dict(self.journal.data.slots).items():  # copied: the worker mutates it
            active = serving.get(name)
            slots[name] = SlotStatus(
                state=rec.state,
                active=active.ref if active else None,
                target_sha256=rec.target.bundle_sha256 if rec.target else None,
                error=rec.error,
                shadow=self.table.shadow_report(name) if rec.shadow_of else None,
            )
        return ReportedStatus(
            device_id=self.config.device_id,
            profile=self.config.profile,
            agent_version=__version__,
            desired_seq=self.journal.data.desired_seq,
            runtimes=self.runtimes,
            slots=slots,
            last_transition=self._last_transition,
            refusal=self._refusal,
            certificate=self._certificate(),
            reported_at=datetime.now(UTC),
        )

    def _certificate(self) -> CertificateStatus | None:
        """The client certificate in use, read again only when its file changed."""
        if self.renewer is None:
            return None
        path = self.renewer.cert_file
        try:
            stamp = path.stat().st_mtime_ns
            if self._cert_cache is None or self._cert_cache[0] != stamp:
                self._cert_cache = (stamp, certificate_status(path))
        except (OSError, ValueError) as e:
            log.warning("cannot read the client certificate %s: %s", path, e)
            return None
        return self._cert_cache[1]

    def publish_status(self) -> None:
        with self._status_lock:
            self.link.publish_status(self.status().to_bytes())
