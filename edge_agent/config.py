"""Agent configuration, read from a TOML file (``edge-agent run --config agent.toml``).

Relative paths in the file are relative to the file's own directory, so an enrolled agent's
directory can be moved as a whole. Errors name the file and the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import tomli_w
from msgspec import Meta, field
from msgspec.structs import force_setattr

from edge_agent.contracts.endpoints import mqtt_endpoint
from edge_agent.contracts.errors import ConfigError
from edge_agent.contracts.structs import FieldError, Matching, Strict, error_field
from edge_agent.lifecycle.probation import ProbationPolicy
from edge_agent.protocol.topics import DEVICE_ID_PATTERN


class _Section(Strict, frozen=True, kw_only=True):
    """A table of ``agent.toml``: a key it does not know is an error (a typo fails loudly)."""


class ServerConfig(_Section, frozen=True, kw_only=True):
    url: str
    credential_file: Path

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise FieldError("url", "must be an http:// or https:// URL")
        force_setattr(self, "url", self.url.rstrip("/"))


class MqttConfig(_Section, frozen=True, kw_only=True):
    url: str
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    #: How long the broker keeps this device's session (and QoS 1 messages) while it is offline.
    session_expiry_s: Annotated[int, Meta(ge=0)] = 7 * 24 * 3600
    #: Password auth (brokers without client certificates): username = device id.
    username: str | None = None
    password_file: Path | None = None
    #: mTLS identity for ``mqtts://`` (written by ``edge-agent enroll``).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: The client certificate is renewed once less than this share of its lifetime is left
    #: (a third: four months of a year's certificate), checked every ``renew_check_s``, which
    #: is also how long a failed renewal waits before the next try.
    renew_remaining: Annotated[float, Meta(gt=0, lt=1)] = 1 / 3
    renew_check_s: Annotated[float, Meta(gt=0)] = 3600.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise FieldError("url", "must look like mqtt://host:1883 or mqtts://host:8883")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)


class ServingConfig(_Section, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8651
    #: The same API on a Unix socket (mode 0660), relative to the config file; "" disables.
    unix_socket: Path | None = Path("serving.sock")


class RuntimeConfig(_Section, frozen=True, kw_only=True):
    #: Intra-op threads; 0 takes the device profile's figure, or the CPUs this process may
    #: run on when they are fewer (a container's CPU set, a board with cores taken offline).
    threads: Annotated[int, Meta(ge=0, le=256)] = 0
    #: Worker threads spin between runs instead of sleeping (see ``LoadOptions.spin``): for a
    #: device that answers back-to-back requests and has cores to spare; measure first.
    spin: bool = False


class DownloadConfig(_Section, frozen=True, kw_only=True):
    attempts: Annotated[int, Meta(ge=1, le=100)] = 5
    timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    #: Cap on download bandwidth (bytes/s), e.g. for metered cellular links; unset: none.
    max_bytes_per_s: Annotated[int, Meta(gt=0)] | None = None
    #: Fetch bundles from this origin (``http://gateway:8600``) instead of the one in the
    #: desired state, keeping the path: a site gateway or cache in front of the fleet server,
    #: or a HIL rig's relay. Integrity does not depend on it (digest and signature).
    mirror_url: str | None = None
    #: Free disk space that must remain after the bundle and its extracted copy.
    reserve_bytes: Annotated[int, Meta(ge=0)] = 64 << 20

    def __post_init__(self) -> None:
        if self.mirror_url is None:
            return
        parts = urlsplit(self.mirror_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise FieldError(
                "mirror_url", "must be an origin such as http://gateway:8600 (no path)"
            )
        force_setattr(self, "mirror_url", self.mirror_url.rstrip("/"))


class TrustConfig(_Section, frozen=True, kw_only=True):
    #: The fleet's root public key (base64), pinned at enrollment.
    root_key_file: Path


class ReportingConfig(_Section, frozen=True, kw_only=True):
    #: Publish the full status at least this often (besides every lifecycle transition).
    status_interval_s: Annotated[float, Meta(gt=0)] = 60.0


class TelemetryConfig(_Section, frozen=True, kw_only=True):
    """Fleet telemetry (see :mod:`edge_agent.telemetry`)."""

    enabled: bool = True
    #: One batch per interval.
    interval_s: Annotated[float, Meta(gt=0)] = 60.0
    #: The interval so far is written to the outbox this often: a crash (kill -9, power cut)
    #: loses at most this much of the figures.
    checkpoint_s: Annotated[float, Meta(gt=0)] = 5.0
    #: Share of inference time that drift accounting may take (requests are sampled to fit).
    budget: Annotated[float, Meta(gt=0, le=1)] = 0.02
    #: Count at least this share of requests whatever the cost (1.0: every request).
    min_sample_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0
    #: Bounds of the on-disk outbox while the server is unreachable (oldest dropped first).
    outbox_max_bytes: Annotated[int, Meta(ge=16 << 10)] = 32 << 20
    outbox_max_age_s: Annotated[float, Meta(gt=0)] = 7 * 24 * 3600.0
    #: A batch not acknowledged by the server within this long is sent again.
    resend_after_s: Annotated[float, Meta(gt=0)] = 30.0


class FeedbackConfig(_Section, frozen=True, kw_only=True):
    """Request ids and kept answers, for labels applications send back (``:feedback``)."""

    enabled: bool = True
    #: Requests whose answers are kept for a label, at most (~150 bytes each).
    capacity: Annotated[int, Meta(ge=1, le=10_000_000)] = 100_000
    #: A label for an older request counts as late.
    max_age_s: Annotated[float, Meta(gt=0)] = 24 * 3600.0
    #: Labels accepted a second (bursts of ten seconds' worth); more: 429.
    max_labels_per_s: Annotated[float, Meta(gt=0)] = 1000.0


class StreamConfig(_Section, frozen=True, kw_only=True):
    """A local stream the agent scores (see ``edge_agent.serving.stream``)."""

    #: The model or slot name whose serving version scores the messages.
    slot: Annotated[str, Meta(min_length=1, max_length=64)]
    #: ``mqtt://host:port/topic`` on the device's own broker, or ``unix:///path`` (relative
    #: paths: ``unix:frames.sock``, next to the config file) for newline-delimited frames.
    input: str
    #: ``mqtt://host:port/topic``; omitted for a Unix input: answers go back on the
    #: connection each frame came from.
    output: str | None = None
    name: Annotated[str, Matching(r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    #: Messages waiting to be scored; when full, the oldest is dropped (and counted).
    queue: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    #: 0: a frame lost between the broker and the agent is lost (a stream wants the newest
    #: frame, and its queue drops the oldest anyway); 1: at least once from the broker, at the
    #: cost of PUBACK round trips, which a broker without ``set_tcp_nodelay`` delays by ~10 ms.
    qos: Annotated[int, Meta(ge=0, le=1)] = 0
    username: str | None = None
    password_file: Path | None = None

    def __post_init__(self) -> None:
        _check_input(self.input)
        if self.output is not None:
            _check_output(self.output)

    @property
    def stream_name(self) -> str:
        return self.name or self.slot


class AgentConfig(_Section, frozen=True, kw_only=True):
    device_id: Annotated[str, Matching(DEVICE_ID_PATTERN)]
    profile: str
    state_dir: Path
    server: ServerConfig
    mqtt: MqttConfig
    trust: TrustConfig
    serving: ServingConfig = field(default_factory=ServingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)
    reporting: ReportingConfig = field(default_factory=ReportingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    streams: Annotated[list[StreamConfig], Meta(max_length=64)] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [s.stream_name for s in self.streams]
        if len(set(names)) != len(names):
            raise FieldError("streams", f"stream names must differ (name = …): {names}")
        for s in self.streams:
            if s.output is None and not s.input.startswith("unix:"):
                raise FieldError(
                    "streams", f"stream {s.stream_name}: an mqtt:// input needs an output topic"
                )

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read agent config: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
        serving = data.get("serving")
        if isinstance(serving, dict) and serving.get("unix_socket") == "":
            serving["unix_socket"] = None
        try:
            config = cls.from_dict(data)
        except ValueError as e:
            field, message = error_field(e)
            where = f"{field}: " if field else ""
            raise ConfigError(f"{path}: {where}{message}", field=field or None) from e
        base = path.parent.resolve()
        return config.replace(
            state_dir=base / config.state_dir,
            server=config.server.replace(credential_file=base / config.server.credential_file),
            trust=TrustConfig(root_key_file=base / config.trust.root_key_file),
            serving=config.serving.replace(
                unix_socket=base / config.serving.unix_socket
                if config.serving.unix_socket
                else None
            ),
            streams=[
                s.replace(
                    input=_unix_relative(s.input, base),
                    password_file=base / s.password_file if s.password_file else None,
                )
                for s in config.streams
            ],
            mqtt=config.mqtt.replace(
                **{
                    name: base / value
                    for name in ("ca_file", "cert_file", "key_file", "password_file")
                    if (value := getattr(config.mqtt, name)) is not None
                }
            ),
        )

    def read_credential(self) -> str:
        try:
            secret = self.server.credential_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"{self.server.credential_file}: cannot read the device credential: {e.strerror}"
                " (run `edge-agent enroll` first)"
            ) from e
        if not secret:
            raise ConfigError(f"{self.server.credential_file}: the device credential is empty")
        return secret


def _check_input(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme == "mqtt":
        host, _, topic = mqtt_endpoint(value)
        if host and topic:
            return
    if parts.scheme == "unix" and parts.path:
        return
    raise FieldError(
        "input", "must look like mqtt://127.0.0.1:1883/topic or unix:///run/frames.sock"
    )


def _check_output(value: str) -> None:
    host, _, topic = mqtt_endpoint(value) if value.startswith("mqtt://") else ("", 0, "")
    if not host or not topic:
        raise FieldError("output", "must look like mqtt://127.0.0.1:1883/topic")
    if "+" in topic or "#" in topic:
        raise FieldError("output", "an output topic cannot hold the wildcards + or #")


def _unix_relative(url: str, base: Path) -> str:
    """``unix:frames.sock`` (relative) → ``unix:///abs/dir/frames.sock``."""
    parts = urlsplit(url)
    if parts.scheme != "unix" or parts.path.startswith("/"):
        return url
    return f"unix://{base / parts.path}"


def render_config(
    *,
    device_id: str,
    profile: str,
    server_url: str,
    mqtt_url: str,
    state_dir: str = "state",
    credential_file: str = "device.secret",
    root_key_file: str = "root.pub",
    serving_port: int = 8651,
    tls: bool = False,
    mqtt_password_file: str | None = None,
) -> str:
    """The TOML text ``edge-agent enroll`` writes (by tomli-w: values from the server are
    escaped, whatever characters they hold)."""
    mqtt: dict[str, str] = {"url": mqtt_url}
    if tls:
        mqtt.update(ca_file="ca.crt", cert_file="device.crt", key_file="device.key")
    if mqtt_password_file:
        mqtt.update(username=device_id, password_file=mqtt_password_file)
    return tomli_w.dumps(
        {
            "device_id": device_id,
            "profile": profile,
            "state_dir": state_dir,
            "server": {"url": server_url, "credential_file": credential_file},
            "mqtt": mqtt,
            "trust": {"root_key_file": root_key_file},
            "serving": {"host": "127.0.0.1", "port": serving_port},
        }
    )
