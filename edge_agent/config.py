"""Agent configuration, read from a TOML file (``edge-agent run --config agent.toml``).

Relative paths in the file are relative to the file's own directory, so an enrolled agent's
directory can be moved as a whole. Errors name the file and the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.contracts.endpoints import mqtt_endpoint
from edge_agent.contracts.errors import ConfigError
from edge_agent.lifecycle.probation import ProbationPolicy
from edge_agent.protocol.topics import DEVICE_ID_PATTERN


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    url: str
    credential_file: Path

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class MqttConfig(_Section):
    url: str
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    #: How long the broker keeps this device's session (and QoS 1 messages) while it is offline.
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
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
    renew_remaining: float = Field(default=1 / 3, gt=0, lt=1)
    renew_check_s: float = Field(default=3600, gt=0)

    @field_validator("url")
    @classmethod
    def _mqtt(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)


class ServingConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8651, ge=0, le=65535)
    #: The same API on a Unix socket (mode 0660), relative to the config file; "" disables.
    unix_socket: Path | None = Path("serving.sock")

    @field_validator("unix_socket", mode="before")
    @classmethod
    def _empty_disables(cls, value: object) -> object:
        return None if value == "" else value


class RuntimeConfig(_Section):
    #: Intra-op threads; 0 takes the device profile's figure, or the CPUs this process may
    #: run on when they are fewer (a container's CPU set, a board with cores taken offline).
    threads: int = Field(default=0, ge=0, le=256)
    #: Worker threads spin between runs instead of sleeping (see ``LoadOptions.spin``): for a
    #: device that answers back-to-back requests and has cores to spare; measure first.
    spin: bool = False


class DownloadConfig(_Section):
    attempts: int = Field(default=5, ge=1, le=100)
    timeout_s: float = Field(default=30.0, gt=0)
    #: Cap on download bandwidth (bytes/s), e.g. for metered cellular links; unset: none.
    max_bytes_per_s: int | None = Field(default=None, gt=0)
    #: Fetch bundles from this origin (``http://gateway:8600``) instead of the one in the
    #: desired state, keeping the path: a site gateway or cache in front of the fleet server,
    #: or a HIL rig's relay. Integrity does not depend on it (digest and signature).
    mirror_url: str | None = None

    @field_validator("mirror_url")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError("must be an origin such as http://gateway:8600 (no path)")
        return value.rstrip("/")

    #: Free disk space that must remain after the bundle and its extracted copy.
    reserve_bytes: int = Field(default=64 << 20, ge=0)


class TrustConfig(_Section):
    #: The fleet's root public key (base64), pinned at enrollment.
    root_key_file: Path


class ReportingConfig(_Section):
    #: Publish the full status at least this often (besides every lifecycle transition).
    status_interval_s: float = Field(default=60.0, gt=0)


class TelemetryConfig(_Section):
    """Fleet telemetry (see :mod:`edge_agent.telemetry`)."""

    enabled: bool = True
    #: One batch per interval.
    interval_s: float = Field(default=60.0, gt=0)
    #: The interval so far is written to the outbox this often: a crash (kill -9, power cut)
    #: loses at most this much of the figures.
    checkpoint_s: float = Field(default=5.0, gt=0)
    #: Share of inference time that drift accounting may take (requests are sampled to fit).
    budget: float = Field(default=0.02, gt=0, le=1)
    #: Count at least this share of requests whatever the cost (1.0: every request).
    min_sample_rate: float = Field(default=0.0, ge=0, le=1)
    #: Bounds of the on-disk outbox while the server is unreachable (oldest dropped first).
    outbox_max_bytes: int = Field(default=32 << 20, ge=16 << 10)
    outbox_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    #: A batch not acknowledged by the server within this long is sent again.
    resend_after_s: float = Field(default=30.0, gt=0)


class FeedbackConfig(_Section):
    """Request ids and kept answers, for labels applications send back (``:feedback``)."""

    enabled: bool = True
    #: Requests whose answers are kept for a label, at most (~150 bytes each).
    capacity: int = Field(default=100_000, ge=1, le=10_000_000)
    #: A label for an older request counts as late.
    max_age_s: float = Field(default=24 * 3600, gt=0)
    #: Labels accepted a second (bursts of ten seconds' worth); more: 429.
    max_labels_per_s: float = Field(default=1000.0, gt=0)


class StreamConfig(_Section):
    """A local stream the agent scores (see ``edge_agent.serving.stream``)."""

    #: The model or slot name whose serving version scores the messages.
    slot: str = Field(min_length=1, max_length=64)
    #: ``mqtt://host:port/topic`` on the device's own broker, or ``unix:///path`` (relative
    #: paths: ``unix:frames.sock``, next to the config file) for newline-delimited frames.
    input: str
    #: ``mqtt://host:port/topic``; omitted for a Unix input: answers go back on the
    #: connection each frame came from.
    output: str | None = None
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: Messages waiting to be scored; when full, the oldest is dropped (and counted).
    queue: int = Field(default=1000, ge=1, le=1_000_000)
    #: 0: a frame lost between the broker and the agent is lost (a stream wants the newest
    #: frame, and its queue drops the oldest anyway); 1: at least once from the broker, at the
    #: cost of PUBACK round trips, which a broker without ``set_tcp_nodelay`` delays by ~10 ms.
    qos: int = Field(default=0, ge=0, le=1)
    username: str | None = None
    password_file: Path | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "mqtt":
            host, _, topic = mqtt_endpoint(value)
            if host and topic:
                return value
        if parts.scheme == "unix" and parts.path:
            return value
        raise ValueError("must look like mqtt://127.0.0.1:1883/topic or unix:///run/frames.sock")

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, _, topic = mqtt_endpoint(value) if value.startswith("mqtt://") else ("", 0, "")
        if not host or not topic:
            raise ValueError("must look like mqtt://127.0.0.1:1883/topic")
        if "+" in topic or "#" in topic:
            raise ValueError("an output topic cannot hold the wildcards + or #")
        return value

    @property
    def stream_name(self) -> str:
        return self.name or self.slot


class AgentConfig(_Section):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    profile: str
    state_dir: Path
    server: ServerConfig
    mqtt: MqttConfig
    trust: TrustConfig
    serving: ServingConfig = ServingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    download: DownloadConfig = DownloadConfig()
    probation: ProbationPolicy = ProbationPolicy()
    reporting: ReportingConfig = ReportingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    streams: list[StreamConfig] = Field(default_factory=list, max_length=64)

    @field_validator("streams")
    @classmethod
    def _streams(cls, value: list[StreamConfig]) -> list[StreamConfig]:
        names = [s.stream_name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must differ (name = …): {names}")
        for s in value:
            if s.output is None and not s.input.startswith("unix:"):
                raise ValueError(f"stream {s.stream_name}: an mqtt:// input needs an output topic")
        return value

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read agent config: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
        try:
            config = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{path}: {field}: {err['msg']}", field=field) from e
        base = path.parent.resolve()
        return config.model_copy(
            update={
                "state_dir": base / config.state_dir,
                "server": config.server.model_copy(
                    update={"credential_file": base / config.server.credential_file}
                ),
                "trust": TrustConfig(root_key_file=base / config.trust.root_key_file),
                "serving": config.serving.model_copy(
                    update={
                        "unix_socket": base / config.serving.unix_socket
                        if config.serving.unix_socket
                        else None
                    }
                ),
                "streams": [
                    s.model_copy(
                        update={
                            "input": _unix_relative(s.input, base),
                            "password_file": base / s.password_file if s.password_file else None,
                        }
                    )
                    for s in config.streams
                ],
                "mqtt": config.mqtt.model_copy(
                    update={
                        name: base / value
                        for name in ("ca_file", "cert_file", "key_file", "password_file")
                        if (value := getattr(config.mqtt, name)) is not None
                    }
                ),
            }
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
