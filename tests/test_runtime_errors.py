"""The docker driver's parts that need no Docker Engine: the one error mapping
(`_translate`) and its coverage, inspect parsing, an engine that does not answer, and
the events stream's reconnects against a scripted client."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from typing import Any

import docker
import docker.errors
import pytest
import requests
import requests.exceptions
import urllib3.exceptions

from helpers import eventually

from shoal.agent.runtime.docker import (
    LABEL_DEPLOYMENT,
    LABEL_GENERATION,
    LABEL_HOST_PORT,
    LABEL_NODE,
    LABEL_REPLICA,
    DockerRuntime,
    _match,
    _observed,
    _parse_docker_time,
    _RULES,
    _translate,
)
from shoal.errors import (
    HostPortInUse,
    ImageNotFound,
    NotFound,
    RuntimeDriverError,
    RuntimeUnavailable,
    ShoalError,
)
from shoal.model import Driver, RunSpec

def api_error(status: int, message: str) -> docker.errors.APIError:
    """An APIError built the way the SDK builds one from an HTTP error response."""
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps({"message": message}).encode()
    response.url = "http+docker://localhost/v1.41/containers/create"
    try:
        docker.errors.create_api_error_from_http_exception(requests.exceptions.HTTPError(response=response))
    except docker.errors.APIError as exc:
        return exc
    raise AssertionError("unreachable")


ALREADY = RuntimeUnavailable("already translated")

# (rule, exception, context, expected type, words the message must contain)
CASES: list[tuple[str, BaseException, dict[str, Any], type[ShoalError], tuple[str, ...]]] = [
    ("shoal", ALREADY, {}, RuntimeUnavailable, ("already translated",)),
    (
        "image_not_found",
        api_error(404, "No such image: shoal-test/nope:latest"),
        {"image": "shoal-test/nope:latest"},
        ImageNotFound,
        ('"shoal-test/nope:latest"', "could not be pulled"),
    ),
    (
        "image_not_found",
        docker.errors.ImageNotFound("No such image: other/img:1"),
        {},
        ImageNotFound,
        ("other/img:1",),
    ),
    (
        "not_found",
        api_error(404, "No such container: shoal-r1"),
        {"replica_id": "r1"},
        NotFound,
        ('replica "r1" not found',),
    ),
    (
        "not_found",
        docker.errors.NotFound("No such container: x"),
        {},
        NotFound,
        ("No such container",),
    ),
    (
        "port_in_use",
        api_error(
            500,
            "driver failed programming external connectivity on endpoint shoal-r2 (abc): "
            "Bind for 0.0.0.0:31000 failed: port is already allocated",
        ),
        {"replica_id": "r2", "host_port": 31000},
        HostPortInUse,
        ("host port 31000 is already in use", "r2"),
    ),
    (
        "port_in_use",
        api_error(
            500,
            "driver failed programming external connectivity on endpoint shoal-r3 (abc): Error "
            "starting userland proxy: listen tcp4 0.0.0.0:31001: bind: address already in use",
        ),
        {"replica_id": "r3"},
        HostPortInUse,
        ("host port 31001 is already in use",),
    ),
    (
        "port_in_use",
        api_error(500, "listen: address already in use"),
        {"replica_id": "r4", "host_port": 31002},
        HostPortInUse,
        ("host port 31002 is already in use",),
    ),
    (
        "command_missing",
        api_error(
            400,
            'failed to create shim task: OCI runtime create failed: runc create failed: unable to '
            'start container process: exec: "/nope": stat /nope: no such file or directory: unknown',
        ),
        {"replica_id": "r5", "image": "img:1"},
        RuntimeDriverError,
        ("r5", "command cannot be run", "img:1", "/nope"),
    ),
    (
        "api_error",
        api_error(409, 'Conflict. The container name "/shoal-r6" is already in use'),
        {"replica_id": "r6"},
        RuntimeDriverError,
        ("refused", "409", "already in use"),
    ),
    (
        "api_error",
        api_error(500, "Minimum memory limit allowed is 6MB"),
        {},
        RuntimeDriverError,
        ("500", "Minimum memory limit"),
    ),
    (
        "engine_unreachable",
        docker.errors.DockerException(
            "Error while fetching server API version: ('Connection aborted.', "
            "FileNotFoundError(2, 'No such file or directory'))"
        ),
        {},
        RuntimeUnavailable,
        ("cannot be reached", "fetching server API version"),
    ),
    (
        "docker_client",
        docker.errors.InvalidArgument("bad port spec"),
        {},
        RuntimeDriverError,
        ("bad port spec",),
    ),
    (
        "timeout",
        requests.exceptions.ReadTimeout("UnixHTTPConnectionPool(host='localhost'): Read timed out."),
        {},
        RuntimeUnavailable,
        ("did not answer in time",),
    ),
    (
        "timeout",
        urllib3.exceptions.ReadTimeoutError(None, "/events", "Read timed out."),  # type: ignore[arg-type]
        {},
        RuntimeUnavailable,
        ("did not answer in time",),
    ),
    (
        "connection",
        requests.exceptions.ConnectionError("('Connection aborted.', ConnectionRefusedError(111, 'Connection refused'))"),
        {},
        RuntimeUnavailable,
        ("cannot be reached", "Connection refused"),
    ),
    (
        "connection",
        ConnectionRefusedError(111, "Connection refused"),
        {},
        RuntimeUnavailable,
        ("cannot be reached",),
    ),
    (
        "connection",
        urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead"),
        {},
        RuntimeUnavailable,
        ("cannot be reached",),
    ),
    ("other", ValueError("something odd"), {}, RuntimeDriverError, ("docker driver failed", "ValueError")),
]


@pytest.mark.parametrize(
    ("rule", "exc", "ctx", "expected", "words"),
    CASES,
    ids=[f"{c[0]}-{type(c[1]).__name__}-{i}" for i, c in enumerate(CASES)],
)
def test_translate(
    rule: str, exc: BaseException, ctx: dict[str, Any], expected: type[ShoalError], words: tuple[str, ...]
) -> None:
    assert _match(exc).name == rule
    translated = _translate(exc, **ctx)
    assert type(translated) is expected
    for word in words:
        assert word in str(translated)


def test_every_rule_is_covered() -> None:
    assert {rule.name for rule in _RULES} == {case[0] for case in CASES}
    assert len({rule.name for rule in _RULES}) == len(_RULES)


def test_a_shoal_error_passes_through_unchanged() -> None:
    assert _translate(ALREADY) is ALREADY


def test_translated_errors_are_runtime_errors_except_not_found() -> None:
    for rule, exc, ctx, _, _ in CASES:
        translated = _translate(exc, **ctx)
        assert isinstance(translated, NotFound if rule == "not_found" else RuntimeDriverError)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-11-25T10:53:12Z", 1732531992.0),
        ("2024-11-25T10:53:12.5Z", 1732531992.5),
        ("2024-11-25T10:53:12.123456789Z", 1732531992.123456789),
        ("2024-11-25T11:53:12.25+01:00", 1732531992.25),
        ("0001-01-01T00:00:00Z", None),
        ("", None),
        (None, None),
        ("yesterday", None),
    ],
)
def test_parse_docker_time(value: str | None, expected: float | None) -> None:
    got = _parse_docker_time(value)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-6)


def inspect_data(state: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    base_labels = {
        LABEL_REPLICA: "r1",
        LABEL_DEPLOYMENT: "web",
        LABEL_GENERATION: "7",
        LABEL_NODE: "n1",
        LABEL_HOST_PORT: "30001",
    }
    return {
        "Id": "c0ffee",
        "Config": {"Labels": base_labels if labels is None else labels},
        "State": {"StartedAt": "2024-11-25T10:53:12Z", "Error": "", "OOMKilled": False, **state},
    }


@pytest.mark.parametrize(
    ("state", "running", "exit_code", "error"),
    [
        ({"Status": "running", "Running": True, "ExitCode": 0}, True, None, ""),
        ({"Status": "exited", "Running": False, "ExitCode": 137}, False, 137, "exited with code 137"),
        ({"Status": "exited", "Running": False, "ExitCode": 0}, False, 0, "exited with code 0"),
        (
            {"Status": "exited", "Running": False, "ExitCode": 137, "OOMKilled": True},
            False,
            137,
            "out of memory",
        ),
        (
            {"Status": "created", "Running": False, "ExitCode": 0, "StartedAt": "0001-01-01T00:00:00Z"},
            False,
            None,
            "never started",
        ),
        (
            {"Status": "exited", "Running": False, "ExitCode": 127, "Error": "exec format error"},
            False,
            127,
            "exec format error",
        ),
    ],
)
def test_observed_from_inspect(state: dict[str, Any], running: bool, exit_code: int | None, error: str) -> None:
    o = _observed(inspect_data(state))
    assert o is not None
    assert (o.replica_id, o.deployment, o.generation, o.host_port, o.handle) == ("r1", "web", 7, 30001, "c0ffee")
    assert o.driver is Driver.DOCKER
    assert (o.running, o.exit_code) == (running, exit_code)
    assert error in o.error
    if state.get("StartedAt", "").startswith("0001"):
        assert o.started_at is None
    else:
        assert o.started_at == 1732531992.0


def test_unlabelled_container_is_not_observed() -> None:
    assert _observed(inspect_data({"Running": True}, labels={})) is None


@pytest.mark.asyncio
# docker-py leaves the socket of a failed unix-socket connect for the GC to close.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
async def test_unreachable_engine_is_runtime_unavailable(tmp_path: Any) -> None:
    client = docker.DockerClient(base_url=f"unix://{tmp_path}/no-docker.sock", version="1.41")
    rt = DockerRuntime("n1", client=client)
    try:
        with pytest.raises(RuntimeUnavailable):
            await rt.list()
        with pytest.raises(RuntimeUnavailable):
            await rt.start(
                RunSpec(replica_id="r1", deployment="d", generation=1, driver=Driver.DOCKER, image="x")
            )
    finally:
        await rt.close()
        client.close()
        gc.collect()  # the leaked sockets go now, while the filter above applies


class _ScriptedStream:
    """An events stream that yields its events, then ends (as when the engine goes away)
    or, with `block`, waits until closed (as a live stream does)."""

    def __init__(self, events: list[dict[str, Any]], *, block: bool = False) -> None:
        self._events = iter(events)
        self._block = block
        self.closed = threading.Event()

    def __iter__(self) -> _ScriptedStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.closed.is_set():
            for event in self._events:
                return event
            if self._block:
                self.closed.wait()
        raise StopIteration

    def close(self) -> None:
        self.closed.set()


class _ScriptedEngine:
    """Just enough of a DockerClient for `changes()`: `api.events` follows a script."""

    def __init__(self, script: list[Any]) -> None:
        self.api = self
        self.script = script
        self.since: list[str | None] = []
        self.filters: list[dict[str, Any]] = []

    def events(self, *, decode: bool, filters: dict[str, Any], since: str | None) -> Any:
        self.since.append(since)
        self.filters.append(filters)
        step = self.script.pop(0) if self.script else _ScriptedStream([], block=True)
        if isinstance(step, BaseException):
            raise step
        return step

    def close(self) -> None:
        pass


def _event(replica_id: str, ns: int) -> dict[str, Any]:
    return {"Type": "container", "Action": "die", "timeNano": ns, "Actor": {"Attributes": {LABEL_REPLICA: replica_id}}}


@pytest.mark.asyncio
async def test_changes_reconnects_after_the_stream_ends_or_fails() -> None:
    engine = _ScriptedEngine(
        [
            _ScriptedStream([_event("r1", 5_000_000_123)]),  # ends: engine restarting
            requests.exceptions.ConnectionError("Connection refused"),  # still down
            _ScriptedStream([_event("r2", 6_000_000_000), {"Actor": {}}]),  # back
        ]
    )
    rt = DockerRuntime("n1", client=engine, events_backoff=(0.01, 0.05))  # type: ignore[arg-type]
    seen: list[str] = []

    async def watch() -> None:
        async for replica_id in rt.changes():
            seen.append(replica_id)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: seen == ["r1", "r2"], what="both events across the reconnects")
    await eventually(lambda: len(engine.since) == 4, what="the live stream after the last one ended")
    await rt.close()
    await asyncio.wait_for(watcher, timeout=5)
    # Each reconnect asks for what happened since the last event seen.
    assert engine.since[1:] == ["5.000000123", "5.000000123", "6.000000000"]
    assert engine.filters[0]["label"] == [f"{LABEL_NODE}=n1"]
    assert set(engine.filters[0]["event"]) == {"start", "die", "oom", "destroy"}
