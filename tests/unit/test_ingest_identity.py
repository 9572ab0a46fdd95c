"""Which MQTT identity each ingest process of ``edgefleet serve`` connects with."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.contracts.errors import ConfigError
from fleet_server.ingest import identity
from fleet_server.settings import Settings


def test_without_an_ingest_dir_they_use_the_servers_identity(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        mqtt_username="edgefleet-server",
        mqtt_password="s3cret",  # type: ignore[arg-type]
    )
    tls, credentials, name = identity(settings, 2)
    assert credentials == ("edgefleet-server", "s3cret") and name == "ingest-2"
    assert tls == (None, None, None)


def test_each_takes_its_own_certificate_or_password_from_the_dir(tmp_path: Path) -> None:
    (tmp_path / "ingest-1-client.crt").write_text("cert")
    (tmp_path / "ingest-1-client.key").write_text("key")
    (tmp_path / "ingest-2.password").write_text("pw-2\n")
    settings = Settings(data_dir=tmp_path, mqtt_ingest_dir=tmp_path, mqtt_ca_file=tmp_path / "ca")
    tls, credentials, _ = identity(settings, 1)
    assert tls == (
        tmp_path / "ca",
        tmp_path / "ingest-1-client.crt",
        tmp_path / "ingest-1-client.key",
    )
    assert credentials is None
    tls, credentials, _ = identity(settings, 2)
    assert credentials == ("edgefleet-ingest-2", "pw-2") and tls[1] is None
    with pytest.raises(ConfigError, match="ingest process 3"):
        identity(settings, 3)
