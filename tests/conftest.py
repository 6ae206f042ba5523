"""Shared fixtures. Integration fixtures start real things (dockerd, agent processes)
and wait on conditions with deadlines; nothing here sleeps to synchronise."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs a running Docker Engine and the locally built images")
    config.addinivalue_line("markers", "e2e: starts real shoal agent processes")
