"""The receiver (IT side): verifies, rebuilds and republishes to MQTT."""
