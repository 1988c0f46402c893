"""Gateway agent and fleet simulator that publish meter readings over MQTT."""
