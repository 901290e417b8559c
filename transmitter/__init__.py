"""The transmitter (OT side): polls PLCs and sends their values one way."""
