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


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("scheduler_sample_size", 0, "--scheduler-sample-size"),
        ("scheduler_sample_threshold", -1, "--scheduler-sample-threshold"),
        ("scheduler_spread_hosts", 0, "--scheduler-spread-hosts"),
    ],
)
def test_scheduler_settings_out_of_range_name_their_flag(field: str, value: int, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        AgentConfig(server=True, **{field: value}).validate()  # type: ignore[arg-type]

