"""Server settings, from ``EDGEFLEET_*`` environment variables.

Embedded defaults (SQLite, an embedded broker, a local artifact directory) are for
development; ``EDGEFLEET_ENV=production`` refuses to start without an external broker and a
strong admin token, so no default that only suits a laptop reaches a real fleet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.contracts.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", frozen=True)

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path.home() / ".edgefleet"
    #: SQLAlchemy URL; ``postgresql://…`` uses psycopg 3. Default: SQLite in ``data_dir``.
    database_url: str | None = None
    #: External broker (``mqtt://host:1883``). Unset: ``edgefleet serve`` starts an embedded one.
    mqtt_url: str | None = None
    #: Broker URL handed to devices at enrollment, when it differs from ``mqtt_url``.
    device_mqtt_url: str | None = None
    #: The server's own MQTT identity for an ``mqtts://`` broker (``edgefleet broker-config``
    #: writes these files).
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    #: The server's own identity on a password-auth broker.
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    #: The ingest processes' own MQTT identities (``ingest-<n>-client.crt/.key``, or
    #: ``ingest-<n>.password`` on a password-auth broker), as ``edgefleet broker-config``
    #: writes them. Unset: they connect with the server's own identity.
    mqtt_ingest_dir: Path | None = None
    #: Status and telemetry ingest processes ``edgefleet serve`` starts beside the API (each a
    #: ``$share/`` member of its own). None: 2 on PostgreSQL, 1 on SQLite; 0: everything in
    #: one process (a small install).
    ingest_processes: int | None = Field(default=None, ge=0, le=16)
    #: A password-auth broker's password file, rewritten by the server at each enrollment
    #: (send the broker SIGHUP to reload it; `edgefleet broker-config --auth password`).
    broker_password_file: Path | None = None
    #: The broker's certificate revocation list (Mosquitto's ``crlfile``) and ACL file, which
    #: the server rewrites when a device is decommissioned (or enrolled again), and the command
    #: that makes the broker reread them (e.g. ``systemctl reload mosquitto``; Mosquitto
    #: rereads its CRL and ACL on SIGHUP). `edgefleet broker-config` prints all three.
    broker_crl_file: Path | None = None
    broker_acl_file: Path | None = None
    broker_reload_command: str | None = None
    #: Port of the embedded broker (only used when ``mqtt_url`` is unset). Kept fixed by
    #: default because enrolled agents are told this URL.
    broker_port: int = Field(default=18830, ge=0, le=65535)
    host: str = "127.0.0.1"
    port: int = Field(default=8600, ge=0, le=65535)
    #: Base URL devices use to download bundles. Default: http://host:port.
    public_url: str | None = None
    #: Where blobs (models, datasets, bundles, HIL reports) are kept: ``s3://bucket/prefix``
    #: (an S3-compatible store; endpoint, region and credentials from the usual AWS
    #: variables) or a directory. Unset: ``<data_dir>/artifacts``.
    artifacts_url: str | None = None
    #: How devices download bundles: ``server`` (through this server, with Range) or
    #: ``presigned`` (the server redirects each device's request to a presigned URL of the S3
    #: store, valid ``presigned_url_ttl_s``; needs an ``s3://`` store).
    bundle_downloads: Literal["server", "presigned"] = "server"
    presigned_url_ttl_s: int = Field(default=300, ge=10, le=7 * 24 * 3600)
    #: The store's endpoint as devices reach it, when it differs from ``AWS_ENDPOINT_URL``
    #: (presigned URLs are signed for the host they name).
    artifacts_presign_endpoint: str | None = None
    #: Admin API token to install at start-up (hashed); unset, one is generated into data_dir.
    admin_token: SecretStr | None = None
    enrollment_token_ttl_s: int = Field(default=24 * 3600, gt=0)
    #: How long a device's MQTT client certificate is valid, from enrollment or renewal (the
    #: agent renews it when a third of that is left: `[mqtt] renew_remaining` in agent.toml).
    device_certificate_validity_s: int = Field(default=365 * 86400, ge=60)
    #: How long a dashboard sign-in lasts (it ends sooner if its API token is revoked).
    ui_session_ttl_s: int = Field(default=12 * 3600, gt=0, le=30 * 24 * 3600)
    desired_state_ttl_s: int = Field(default=30 * 24 * 3600, gt=0)
    max_upload_bytes: int = Field(default=2 << 30, gt=0)
    #: A request body that sends nothing for this long is cut off (408): slow clients cannot
    #: hold the server's memory or a worker.
    body_chunk_timeout_s: float = Field(default=30.0, gt=0)
    #: Minimum time between two sends of the same document to a device that reports it is
    #: behind (its status may simply predate the document).
    desired_resend_interval_s: float = Field(default=5.0, ge=0)
    #: The bound on each device's status reports: a burst, then this many a second (a device
    #: reports each lifecycle step; past the bound, reports are dropped and counted in
    #: ``edgefleet_status_refused_total{reason="rate"}``).
    status_rate_per_s: float = Field(default=5.0, gt=0)
    status_burst: float = Field(default=50.0, ge=1)
    #: How long a claimed build's lease holds without renewal (a build whose server process
    #: died is taken over by another process after this).
    build_lease_s: float = Field(default=30.0, ge=1)
    #: Concurrent build jobs (each a subprocess; a TFLite build of a 30 MB CNN peaks near 2.5 GB).
    build_workers: int = Field(default=1, ge=1, le=64)
    #: Ingest telemetry in this process (a ``$share/`` member; more: `edgefleet telemetry
    #: ingest`). Rollup bucket size, and the window alerts and /metrics look back over.
    telemetry_ingest: bool = True
    telemetry_bucket_s: int = Field(default=60, ge=1, le=86_400)
    telemetry_window_s: float = Field(default=900, gt=0)
    #: How long each resolution of telemetry rollups is kept (fleet_server.telemetry.retention):
    #: ingest buckets 7 days, then hourly 90 days, then daily for good; ``forever``: no
    #: downsampling. Applied once every ``telemetry_retention_interval_s``.
    telemetry_retention: str = "7d,1h:90d,1d"
    telemetry_retention_interval_s: float = Field(default=3600, gt=0)
    #: A build running longer is killed and fails.
    build_timeout_s: float = Field(default=3600, gt=0)
    #: How long creating a rollout waits for the builds it needs.
    rollout_build_wait_s: float = Field(default=1800, gt=0)
    #: How often the rollout reconciler steps every active rollout (and at once on reports).
    rollout_tick_s: float = Field(default=1.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _presigned_needs_s3(self) -> Settings:
        if self.bundle_downloads == "presigned" and not (self.artifacts_url or "").startswith(
            "s3://"
        ):
            raise ConfigError(
                "EDGEFLEET_BUNDLE_DOWNLOADS=presigned needs an S3 artifact store "
                "(EDGEFLEET_ARTIFACTS_URL=s3://bucket/prefix)"
            )
        return self

    @model_validator(mode="after")
    def _production_guard(self) -> Settings:
        if self.env != "production":
            return self
        if self.mqtt_url is None:
            raise ConfigError(
                "EDGEFLEET_ENV=production needs EDGEFLEET_MQTT_URL: the embedded broker "
                "accepts anonymous clients and is for development only"
            )
        token = self.admin_token.get_secret_value() if self.admin_token else None
        if token is not None and len(token) < 32:
            raise ConfigError("EDGEFLEET_ADMIN_TOKEN must be at least 32 characters in production")
        return self

    @property
    def resolved_database_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.data_dir / 'edgefleet.db'}"
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @property
    def resolved_ingest_processes(self) -> int:
        if self.ingest_processes is not None:
            return self.ingest_processes
        return 2 if self.resolved_database_url.startswith("postgresql") else 1

    @property
    def resolved_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"
