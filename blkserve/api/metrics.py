"""`GET /metrics`: the control plane's view for Prometheus (prometheus-client).

Volume and export gauges are computed at scrape time from the daemon's state;
the per-request engine counters come with the observability work."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class ControlPlaneCollector:
    def __init__(self, controller):
        self.controller = controller

    def collect(self):
        c = self.controller
        size = GaugeMetricFamily("blkserve_volume_size_bytes", "Volume capacity in bytes.",
                                 labels=["volume"])
        up = GaugeMetricFamily("blkserve_export_up",
                               "1 if the volume's export worker is running, else 0.",
                               labels=["volume"])
        restarts = CounterMetricFamily("blkserve_worker_restarts",
                                       "Export worker restarts by the supervisor.",
                                       labels=["volume"])
        atts = GaugeMetricFamily("blkserve_attachments", "Attachments by state.",
                                 labels=["volume", "state"])
        for v in c.state.volumes():
            size.add_metric([v.name], v.size_bytes)
            exp = c.export_view(v.name)
            if exp is not None:
                up.add_metric([v.name], 1.0 if exp["state"] == "running" else 0.0)
                restarts.add_metric([v.name], exp["restarts"])
            counts: dict[str, int] = {}
            for a in c.state.attachments(v.name):
                counts[a.state] = counts.get(a.state, 0) + 1
            for state, n in sorted(counts.items()):
                atts.add_metric([v.name, state], n)
        yield from (size, up, restarts, atts)


def registry_for(controller) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    reg.register(ControlPlaneCollector(controller))
    return reg
