"""The server's side of MQTT: publish desired state, ingest status and presence."""
