"""Shared fixtures. Integration fixtures start real things (dockerd, agent processes)
and wait on conditions with deadlines; nothing here sleeps to synchronise."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest_plugins: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs a running Docker Engine and the locally built images")
    config.addinivalue_line("markers", "e2e: starts real shoal agent processes")
    config.addinivalue_line("markers", "netns: builds a multi-host cluster in Linux network namespaces (root, ip, nft)")


# -- multi-host clusters in Linux network namespaces (tests/netns.py) ------------------


@pytest.fixture(scope="module")
def netns_cluster_factory() -> Iterator[Callable[..., Any]]:
    """`make(n=3, **kwargs)` builds a `tests.netns.NetnsCluster` of n hosts (agents Ready)
    and returns it; every cluster made is torn down when the module ends, even after a
    failure. Skips, saying why, where namespaces cannot be made (not root, no ip/nft)."""
    from tests.netns import NetnsCluster, NetnsUnavailable, require_netns

    made: list[NetnsCluster] = []

    def make(n: int = 3, **kwargs: Any) -> NetnsCluster:
        try:
            require_netns()
        except NetnsUnavailable as exc:
            pytest.skip(str(exc))
        cluster = NetnsCluster(n, **kwargs)
        made.append(cluster)
        try:
            cluster.up()
        except NetnsUnavailable as exc:
            pytest.skip(str(exc))
        return cluster

    yield make
    errors = []
    for cluster in made:
        try:
            cluster.close()
        except Exception as exc:  # close them all, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def netns_cluster(netns_cluster_factory: Callable[..., Any]) -> Any:
    """Three hosts h1 (server), h2, h3 in network namespaces, shared by a module."""
    return netns_cluster_factory(3)
