"""`AgentConfig.validate()`: the settings a multi-host agent must get right."""

from __future__ import annotations

import pytest

from shoal.agent.main import AgentConfig
from shoal.errors import ConfigError


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", ""])
def test_wildcard_bind_needs_an_advertise_address(bind: str) -> None:
    with pytest.raises(ConfigError, match="--advertise"):
        AgentConfig(join=("10.0.0.1",), bind=bind).validate()
    AgentConfig(join=("10.0.0.1",), bind=bind, advertise="10.0.0.7").validate()
    AgentConfig(dev=True, bind=bind).validate()  # loopback only: 127.0.0.1 is right


def test_advertise_defaults_to_bind() -> None:
    cfg = AgentConfig(server=True, bind="198.18.0.1")
    cfg.validate()
    assert cfg.advertise_address == "198.18.0.1"
