"""The agent's link to the fleet: its MQTT connection (``mqtt.py``)."""
