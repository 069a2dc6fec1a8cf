"""Prometheus metrics on a localhost port (``[metrics] enabled = true``).

Values are read from the node when Prometheus scrapes (a custom collector), so the event loop
does no bookkeeping for them.  prometheus-client serves from its own thread; the collector only
reads plain attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from p2pfed.federated import FederatedNode


class NodeCollector(Collector):
    def __init__(self, node: FederatedNode, connected: Callable[[], int]) -> None:
        self.node = node
        self.connected = connected

    def collect(self) -> Iterator[Any]:
        node = self.node
        rnd = GaugeMetricFamily("p2pfed_round", "Current round per component", labels=["component"])
        done = CounterMetricFamily("p2pfed_rounds_completed", "Rounds mixed since start",
                                   labels=["component"])
        dist = GaugeMetricFamily("p2pfed_consensus_distance",
                                 "Largest relative distance to a neighbour's update, last round",
                                 labels=["component"])
        for name in sorted(node.components):
            rnd.add_metric([name], node.round_of(name))
            done.add_metric([name], node.completed_of(name))
            hist = node.disagreement_of(name)
            if hist:
                dist.add_metric([name], hist[-1])
        rejected = CounterMetricFamily("p2pfed_rejected_messages",
                                       "Messages refused from peers, by reason", labels=["reason"])
        for code, count in sorted(node.rejected.items()):
            rejected.add_metric([code], count)
        yield from (rnd, done, dist, rejected)
        yield GaugeMetricFamily("p2pfed_members", "Federation members", value=len(node.members()))
        yield GaugeMetricFamily("p2pfed_connected_peers", "Connected peers",
                                value=self.connected())
        yield GaugeMetricFamily("p2pfed_ledger_entries", "Ledger entries", value=len(node.ledger))


class MetricsServer:
    """Serves the registry on ``address:port`` until :meth:`close`."""

    def __init__(self, node: FederatedNode, connected: Callable[[], int], address: str,
                 port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(node, connected))
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
