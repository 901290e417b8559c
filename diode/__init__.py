"""diode: a software-defined unidirectional gateway.

The package is the functional core shared by both daemons: wire format, FEC,
keys and signatures, replay protection, records and config. It never opens a
socket, never imports asyncio and never reads the clock: the shells in
``transmitter`` and ``receiver`` pass ``now`` in.
"""

__version__ = "0.1.0"
