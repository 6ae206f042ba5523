"""`shoal top`'s arithmetic: rates from two scrapes, sums over agents, quantiles."""

from __future__ import annotations

import pytest

from shoal.cli.top import Scrape, _quantile, node_rows, parse, service_rows


def scrape(node: str, t: float, text: str) -> Scrape:
    return Scrape(node=node, status="Ready", time=t, samples=parse(text))


def metrics(conns_a: int, conns_b: int, bytes_in: int, buckets: tuple[int, int, int]) -> str:
    b1, b2, binf = buckets
    return f"""# TYPE shoal_proxy_connections counter
shoal_proxy_connections_total{{service="web",endpoint="web-a"}} {conns_a}
shoal_proxy_connections_total{{service="web",endpoint="web-b"}} {conns_b}
# TYPE shoal_proxy_bytes counter
shoal_proxy_bytes_total{{service="web",direction="in"}} {bytes_in}
# TYPE shoal_service_endpoints gauge
shoal_service_endpoints{{service="web"}} 2
# TYPE shoal_service_table_version gauge
shoal_service_table_version{{service="web"}} 3
# TYPE shoal_proxy_first_byte_seconds histogram
shoal_proxy_first_byte_seconds_bucket{{service="web",le="0.001"}} {b1}
shoal_proxy_first_byte_seconds_bucket{{service="web",le="0.01"}} {b2}
shoal_proxy_first_byte_seconds_bucket{{service="web",le="+Inf"}} {binf}
shoal_proxy_first_byte_seconds_count{{service="web"}} {binf}
shoal_proxy_first_byte_seconds_sum{{service="web"}} 0
# TYPE shoal_replicas gauge
shoal_replicas{{state="ready"}} 2
shoal_replicas{{state="starting"}} 1
# TYPE shoal_node_network_bytes counter
shoal_node_network_bytes_total{{direction="receive"}} {bytes_in * 2}
shoal_node_network_bytes_total{{direction="transmit"}} 0
"""


def test_service_rates_sum_over_agents_and_quantiles_come_from_bucket_deltas() -> None:
    before = {"n1": scrape("n1", 10.0, metrics(5, 5, 100, (10, 10, 10))),
              "n2": scrape("n2", 10.0, metrics(0, 0, 0, (0, 0, 0)))}
    now = [scrape("n1", 12.0, metrics(15, 5, 300, (10, 20, 20))),
           scrape("n2", 12.0, metrics(4, 6, 100, (10, 10, 10)))]
    (row,) = service_rows(before, now)
    assert row["service"] == "web"
    assert row["connections_per_second"] == pytest.approx((10 + 10) / 2)
    assert row["bytes_in_per_second"] == pytest.approx((200 + 100) / 2)
    assert row["endpoints"] == 2 and row["table_version"] == 3
    # In the interval: 10 answered under 1 ms (n2), 10 between 1 and 10 ms (n1).
    assert row["first_byte_p50_seconds"] == pytest.approx(0.001)
    assert 0.001 < row["first_byte_p99_seconds"] <= 0.01


def test_node_rows_without_a_previous_scrape_have_no_rates_and_count_replicas() -> None:
    (row,) = node_rows({}, [scrape("n1", 1.0, metrics(1, 1, 50, (1, 1, 1)))])
    assert row["network_receive_bytes_per_second"] == 0.0
    assert (row["replicas_ready"], row["replicas"]) == (2.0, 3.0)
    assert row["reachable"]


def test_quantile_edges() -> None:
    assert _quantile([], 0.5) is None
    assert _quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert _quantile([(0.1, 4.0), (float("inf"), 4.0)], 0.5) == pytest.approx(0.05)
    assert _quantile([(0.1, 0.0), (float("inf"), 4.0)], 0.99) == 0.1, "beyond the last bound: the last bound"
