"""`shoal top nodes|services`: live figures from every agent's /metrics.

The server names the nodes and where each serves its metrics (`shoal get nodes`); this
module scrapes them all (concurrently, one second's budget), and turns two scrapes into
rates. Pure functions (`node_rows`, `service_rows`) do the arithmetic so it is tested
without a cluster.
"""

from __future__ import annotations

import concurrent.futures
import math
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Scrape", "node_rows", "parse", "scrape_all", "service_rows"]

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class Scrape:
    """One agent's metrics at one moment (`samples` is empty if it did not answer)."""

    node: str
    status: str
    time: float
    samples: Samples = field(default_factory=dict)
    error: str = ""


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _fetch(address: str, port: int, timeout: float) -> str:
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=timeout) as resp:  # noqa: S310 - http only
        return str(resp.read().decode())


def scrape_all(nodes: Iterable[Any], now: float, timeout: float = 1.0) -> list[Scrape]:
    """Scrape every node (shoal.v1.Node messages) that serves metrics."""
    nodes = list(nodes)

    def one(n: Any) -> Scrape:
        sc = Scrape(node=n.name, status=n.status, time=now)
        if not n.metrics_port:
            sc.error = "no metrics port"
            return sc
        try:
            sc.samples = parse(_fetch(n.address, n.metrics_port, timeout))
        except Exception as exc:  # noqa: BLE001 - one silent agent must not hide the others
            sc.error = str(exc)
        return sc

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, max(1, len(nodes)))) as pool:
        return list(pool.map(one, nodes))


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in samples.get(name, []):
        key = lab.get(label, "")
        out[key] = out.get(key, 0.0) + v
    return out


def _rate(now: float, before: float, dt: float) -> float:
    return max(0.0, now - before) / dt if dt > 0 else 0.0


def node_rows(before: Mapping[str, Scrape], now: list[Scrape]) -> list[dict[str, Any]]:
    rows = []
    for sc in sorted(now, key=lambda s: s.node):
        prev = before.get(sc.node)
        dt = sc.time - prev.time if prev is not None else 0.0
        s = sc.samples
        p = prev.samples if prev is not None else {}
        replicas = _by(s, "shoal_replicas", "state")
        rows.append({
            "node": sc.node,
            "status": sc.status,
            "reachable": not sc.error,
            "cpu_percent": _value(s, "shoal_node_cpu_percent"),
            "memory_used_bytes": _value(s, "shoal_node_memory_used_bytes"),
            "memory_total_bytes": _value(s, "shoal_node_memory_total_bytes"),
            "disk_used_bytes": _value(s, "shoal_node_disk_used_bytes"),
            "disk_total_bytes": _value(s, "shoal_node_disk_total_bytes"),
            "network_receive_bytes_per_second": _rate(
                _value(s, "shoal_node_network_bytes_total", direction="receive"),
                _value(p, "shoal_node_network_bytes_total", direction="receive"), dt),
            "network_transmit_bytes_per_second": _rate(
                _value(s, "shoal_node_network_bytes_total", direction="transmit"),
                _value(p, "shoal_node_network_bytes_total", direction="transmit"), dt),
            "replicas_ready": replicas.get("ready", 0.0),
            "replicas": sum(replicas.values()),
            "active_connections": _value(s, "shoal_proxy_active_connections"),
        })
    return rows


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile from cumulative (upper bound, count) pairs, as Prometheus'
    histogram_quantile does: linear within the bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            width = count - below
            return lower + (upper - lower) * ((rank - below) / width if width > 0 else 1.0)
        lower, below = upper, count
    return None


def service_rows(before: Mapping[str, Scrape], now: list[Scrape]) -> list[dict[str, Any]]:
    """Per service, summed over every agent's proxy: rates since `before`."""
    services: dict[str, dict[str, Any]] = {}
    for sc in now:
        prev = before.get(sc.node)
        dt = sc.time - prev.time if prev is not None else 0.0
        s = sc.samples
        p = prev.samples if prev is not None else {}
        names = set(_by(s, "shoal_service_endpoints", "service")) | set(_by(s, "shoal_proxy_connections_total", "service"))
        for svc in names:
            row = services.setdefault(svc, {
                "service": svc, "connections_per_second": 0.0, "active_connections": 0.0,
                "bytes_in_per_second": 0.0, "bytes_out_per_second": 0.0, "errors_per_second": 0.0,
                "retries_per_second": 0.0, "endpoints": 0.0, "table_version": 0.0, "_buckets": {}})
            for key, metric, labels in (
                ("connections_per_second", "shoal_proxy_connections_total", {}),
                ("bytes_in_per_second", "shoal_proxy_bytes_total", {"direction": "in"}),
                ("bytes_out_per_second", "shoal_proxy_bytes_total", {"direction": "out"}),
                ("errors_per_second", "shoal_proxy_errors_total", {}),
                ("retries_per_second", "shoal_proxy_retries_total", {}),
            ):
                row[key] += _rate(_value(s, metric, service=svc, **labels), _value(p, metric, service=svc, **labels), dt)
            row["active_connections"] += _value(s, "shoal_proxy_active_connections", service=svc)
            row["endpoints"] = max(row["endpoints"], _value(s, "shoal_service_endpoints", service=svc))
            row["table_version"] = max(row["table_version"], _value(s, "shoal_service_table_version", service=svc))
            for lab, v in s.get("shoal_proxy_first_byte_seconds_bucket", []):
                if lab.get("service") == svc:
                    le = float(lab["le"])
                    old = next((pv for pl, pv in p.get("shoal_proxy_first_byte_seconds_bucket", [])
                                if pl.get("service") == svc and pl.get("le") == lab["le"]), 0.0)
                    row["_buckets"][le] = row["_buckets"].get(le, 0.0) + max(0.0, v - old)
    rows = []
    for svc in sorted(services):
        row = services[svc]
        buckets = list(row.pop("_buckets").items())
        row["first_byte_p50_seconds"] = _quantile(buckets, 0.5)
        row["first_byte_p99_seconds"] = _quantile(buckets, 0.99)
        rows.append(row)
    return rows
