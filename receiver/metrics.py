"""Prometheus metrics, read from the receiver's counters at scrape time.

A collector rather than metric objects updated on the hot path: the decoder
already counts everything, so a scrape costs a dict copy and a datagram costs
nothing extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from receiver.app import Receiver


TRANSMITTER_LOSSES = {
    "syslog_kernel_drops": "syslog datagrams the transmitter's kernel dropped (UDP queue full)",
    "syslog_rate_dropped": "syslog messages over their source's rate limit",
    "syslog_denied": "syslog messages from sources not allowed",
    "log_dropped_full": "log messages dropped: the transmitter's log lane was full",
}


class _ReceiverCollector(Collector):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counters = self._receiver.counters()
        rejected = CounterMetricFamily(
            "diode_rx_datagrams_rejected", "datagrams rejected, by reason", labels=["reason"]
        )
        for name, value in sorted(counters.items()):
            if name.startswith("rejected_"):
                rejected.add_metric([name.removeprefix("rejected_")], value)
            elif name in (
                "mqtt_connected",
                "mqtt_spool_depth",
                "failover_active",
                "soc_spool_depth",
            ) or name.endswith(
                ("_history_depth", "_bd_seq")  # a Sparkplug node's (sparkplug_<stream>_...)
            ):
                yield GaugeMetricFamily(f"diode_rx_{name}", name.replace("_", " "), value=value)
            else:
                yield CounterMetricFamily(f"diode_rx_{name}", name.replace("_", " "), value=value)
        yield rejected
        link = GaugeMetricFamily("diode_rx_link_up", "link up, per stream", labels=["stream"])
        pending = GaugeMetricFamily(
            "diode_rx_samples_pending",
            "samples waiting for their catalogue entry, per stream",
            labels=["stream"],
        )
        for view in self._receiver.router.streams.values():
            link.add_metric([str(view.stream_id)], 1.0 if view.link_up else 0.0)
            pending.add_metric([str(view.stream_id)], float(len(view.pending)))
        yield link
        yield pending
        yield from self._transmitter_losses()

    def _transmitter_losses(self) -> Iterator[CounterMetricFamily]:
        """Syslog the transmitter lost before numbering it, from its last heartbeat.

        These never got a lane number, so no gap at the receiver covers them: the
        transmitter's own counts are the only record, and the IT side reads them here.
        """
        views = self._receiver.router.streams.values()
        for name, what in TRANSMITTER_LOSSES.items():
            family = CounterMetricFamily(f"diode_tx_{name}", what, labels=["stream"])
            for view in views:
                if view.heartbeat is not None and name in view.heartbeat.counters:
                    family.add_metric([str(view.stream_id)], view.heartbeat.counters[name])
            yield family


class Metrics:
    def __init__(self, receiver: Receiver) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ReceiverCollector(receiver))
        self._server: WSGIServer | None = None

    def serve(self, address: str, port: int) -> None:
        self._server, _thread = start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
