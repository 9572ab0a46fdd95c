"""The agent config ``edge-agent enroll`` writes is valid TOML whatever the server sends, and
reads back as it was meant."""

from __future__ import annotations

from pathlib import Path

from edge_agent.config import AgentConfig, render_config


def test_values_with_quotes_and_newlines_are_escaped(tmp_path: Path) -> None:
    (tmp_path / "device.secret").write_text("efd_x\n")
    url = 'http://fleet.example:8600/a"b\\c\n[trust]'
    text = render_config(
        device_id="cam-1",
        profile="x86-64-avx2",
        server_url=url,
        mqtt_url="mqtt://127.0.0.1:1883",
        tls=True,
        mqtt_password_file="device.mqtt-password",
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    # The URL is refused as a URL (it is not one), but as the value it was: no injection.
    import tomllib

    doc = tomllib.loads(text)
    assert doc["server"]["url"] == url and doc["trust"] == {"root_key_file": "root.pub"}
    assert doc["mqtt"]["username"] == "cam-1" and doc["mqtt"]["cert_file"] == "device.crt"


def test_a_rendered_config_loads(tmp_path: Path) -> None:
    (tmp_path / "device.secret").write_text("efd_x\n")
    path = tmp_path / "agent.toml"
    path.write_text(
        render_config(
            device_id="cam-1",
            profile="raspberry-pi-5",
            server_url="http://fleet:8600",
            mqtt_url="mqtt://fleet:1883",
            serving_port=9000,
        )
    )
    config = AgentConfig.load(path)
    assert (config.device_id, config.profile, config.serving.port) == (
        "cam-1",
        "raspberry-pi-5",
        9000,
    )
    assert config.server.credential_file == tmp_path / "device.secret"
