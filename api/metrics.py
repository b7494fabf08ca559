"""`GET /metrics`: everything for Prometheus (prometheus-client), computed at
scrape time: volume and export state from the daemon, and the engine's
per-queue counters and latency histograms read from each export worker's
shared stats block (blkserve.stats), summed over the volume's queues."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from blkserve import stats

log = logging.getLogger("blkserve.metrics")

# Histogram bounds: the engine's log2 buckets from 2^13 ns (8.2 us) to 2^30 ns
# (1.07 s); engine bucket i counts requests faster than 2^i ns.
BUCKET_BITS = range(13, 31)
# QoS waits: 8.2 us to 8.6 s
WAIT_BITS = range(13, 34)
ALWAYS_OPS = ("read", "write", "flush", "discard", "write_zeroes", "get_id")


def _log2_hist(counts: list[int], bits: range) -> list[tuple[str, int]]:
    cum, out = 0, []
    for b, n in enumerate(counts):
        cum += n
        if b in bits:
            out.append((repr((1 << b) / 1e9), cum))
    out.append(("+Inf", cum))
    return out


def engine_metrics(snapshots: dict[str, stats.Snapshot]):
    reqs = CounterMetricFamily("blkserve_requests", "Requests completed by the engine, "
                               "by operation.", labels=["volume", "op"])
    nbytes = CounterMetricFamily("blkserve_bytes", "Data bytes of requests completed "
                                 "successfully, by operation.", labels=["volume", "op"])
    errors = CounterMetricFamily("blkserve_errors", "Requests answered with an error "
                                 "status (ioerr: VIRTIO_BLK_S_IOERR, unsupp: "
                                 "VIRTIO_BLK_S_UNSUPP).", labels=["volume", "op", "status"])
    hist = HistogramMetricFamily("blkserve_request_duration_seconds", "Time from "
                                 "descriptor pop to used-ring entry.", labels=["volume", "op"])
    inflight = GaugeMetricFamily("blkserve_inflight_requests", "Requests submitted to the "
                                 "backing and not yet completed.", labels=["volume"])
    bad = CounterMetricFamily("blkserve_bad_descriptor_chains", "Malformed descriptor "
                              "chains from the guest (completed empty).", labels=["volume"])
    broken = GaugeMetricFamily("blkserve_queues_broken", "Queues stopped by a ring-level "
                               "guest fault until the guest resets the device.",
                               labels=["volume"])
    kicks = CounterMetricFamily("blkserve_guest_kicks", "Kicks received from the guest.",
                                labels=["volume"])
    notifies = CounterMetricFamily("blkserve_guest_notifications", "Interrupts sent to the "
                                   "guest.", labels=["volume"])
    throttled = CounterMetricFamily("blkserve_throttled_requests", "Requests held for QoS "
                                    "budget (the volume's limits or its group's).",
                                    labels=["volume"])
    waited = HistogramMetricFamily("blkserve_throttle_wait_seconds", "Time requests were "
                                   "held for QoS budget. Each queue holds one request at a "
                                   "time: the rate of _sum is the share of time the "
                                   "volume's queues were held.", labels=["volume"])
    polls = CounterMetricFamily("blkserve_polls", "Polling windows the volume's queues "
                                "spun on the rings before sleeping (--poll-us), by whether "
                                "work came within them.", labels=["volume", "outcome"])
    polling = CounterMetricFamily("blkserve_poll_seconds", "Time the volume's queues spent "
                                  "polling (a CPU core busy): its rate is the cores used.",
                                  labels=["volume"])
    for vol, snap in sorted(snapshots.items()):
        qs = snap.queues
        for o, op in enumerate(stats.OPS):
            done = [sum(q.op_status[o][st] for q in qs) for st in range(len(stats.STATUSES))]
            if op not in ALWAYS_OPS and not sum(done):
                continue
            reqs.add_metric([vol, op], sum(done))
            nbytes.add_metric([vol, op], sum(q.op_bytes[o] for q in qs))
            for st, status in enumerate(stats.STATUSES[1:], start=1):
                errors.add_metric([vol, op, status], done[st])
            buckets = [sum(q.op_lat_hist[o][b] for q in qs) for b in range(stats.LAT_BUCKETS)]
            hist.add_metric([vol, op], _log2_hist(buckets, BUCKET_BITS),
                            sum(q.op_lat_sum_ns[o] for q in qs) / 1e9)
        inflight.add_metric([vol], sum(q.inflight for q in qs))
        bad.add_metric([vol], sum(q.bad_chains for q in qs))
        broken.add_metric([vol], sum(q.broken for q in qs))
        kicks.add_metric([vol], sum(q.kicks for q in qs))
        notifies.add_metric([vol], sum(q.notifies for q in qs))
        throttled.add_metric([vol], sum(q.throttled for q in qs))
        hits = sum(q.poll_hits for q in qs)
        polls.add_metric([vol, "hit"], hits)
        polls.add_metric([vol, "miss"], sum(q.polls for q in qs) - hits)
        polling.add_metric([vol], sum(q.poll_ns for q in qs) / 1e9)
        wh = [sum((q.throttle_wait_hist or [0] * stats.LAT_BUCKETS)[b] for q in qs)
              for b in range(stats.LAT_BUCKETS)]
        waited.add_metric([vol], _log2_hist(wh, WAIT_BITS),
                          sum(q.throttle_wait_ns for q in qs) / 1e9)
    return (reqs, nbytes, errors, hist, inflight, bad, broken, kicks, notifies, throttled,
            waited, polls, polling)


def qos_metrics(volumes: list, groups: list):
    """Limits in force (gauges) per volume and group; a group's throttled
    requests and waits (counted in its shared block by every member)."""
    limit = GaugeMetricFamily("blkserve_qos_limit", "A volume's QoS limit in force: "
                              "requests/s (iops_*) or bytes/s (bps_*).",
                              labels=["volume", "kind"])
    burst = GaugeMetricFamily("blkserve_qos_burst_limit", "A volume's QoS burst rate "
                              "(KIND_max).", labels=["volume", "kind"])
    glimit = GaugeMetricFamily("blkserve_qos_group_limit", "A QoS group's limit in force.",
                               labels=["group", "kind"])
    gburst = GaugeMetricFamily("blkserve_qos_group_burst_limit", "A QoS group's burst "
                               "rate.", labels=["group", "kind"])
    gthrottled = CounterMetricFamily("blkserve_qos_group_throttled_requests", "Requests of "
                                     "the group's volumes held for the group's budget.",
                                     labels=["group"])
    gwaited = HistogramMetricFamily("blkserve_qos_group_throttle_wait_seconds", "Time "
                                    "requests were held for the group's budget.",
                                    labels=["group"])
    for name, limits, _ in volumes:
        for kind, lim in sorted(limits.items()):
            limit.add_metric([name, kind], lim.rate)
            if lim.burst:
                burst.add_metric([name, kind], lim.burst)
    for name, limits, block in groups:
        for kind, lim in sorted(limits.items()):
            glimit.add_metric([name, kind], lim.rate)
            if lim.burst:
                gburst.add_metric([name, kind], lim.burst)
        n, wait_ns, hist_counts = block.counters()
        gthrottled.add_metric([name], n)
        gwaited.add_metric([name], _log2_hist(hist_counts, WAIT_BITS), wait_ns / 1e9)
    return (limit, burst, glimit, gburst, gthrottled, gwaited)


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
        snapshots = {}
        for exp in c.state.exports():
            try:
                snapshots[exp.volume] = stats.read(c.stats_path(exp.volume))
            except stats.StatsError as e:
                log.debug("no engine stats for %s: %s", exp.volume, e)
        yield from engine_metrics(snapshots)
        yield from qos_metrics(*c.qos_metrics())


def registry_for(controller) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    reg.register(ControlPlaneCollector(controller))
    return reg
