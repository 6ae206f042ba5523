"""The Docker driver: replicas as Docker Engine containers, through the docker SDK.

Rules:
- A replica is the container `shoal-<replica_id>`, labelled `io.shoal.replica`,
  `io.shoal.deployment`, `io.shoal.generation`, `io.shoal.node` (this agent's node name)
  and `io.shoal.host-port`. `list()` and `changes()` filter on `io.shoal.node`, so two
  agents sharing one engine never see or touch each other's containers.
- Kubernetes semantics: `command` replaces the image's ENTRYPOINT, `args` its CMD (with a
  `command` the image's CMD is dropped, as Docker does for an overridden entrypoint).
- `container_port/tcp` is published on `host_port` on all interfaces; with no host port
  nothing is published.
- No Docker restart policy: whether and when a replica restarts is the agent's decision.
- `start()` removes a container of the same name first. A missing image gets one pull;
  when that fails too, `ImageNotFound`.
- Every docker/requests error becomes a shoal error in one place, `_translate`, a table
  of rules (`_RULES`, first match wins) whose every row a unit test exercises:

    ShoalError                                   itself
    docker ImageNotFound (404 "No such image")   ImageNotFound
    docker NotFound (404)                        NotFound("replica", id)
    APIError: port already allocated / in use    RuntimeDriverError "host port N is in use"
    APIError: OCI runtime cannot exec command    RuntimeDriverError "command cannot be run"
    any other APIError                           RuntimeDriverError
    bare DockerException (from_env, no engine)   RuntimeUnavailable
    other DockerException (client-side misuse)   RuntimeDriverError
    timeouts (requests, urllib3, socket)         RuntimeUnavailable
    connection errors (requests, urllib3, OS)    RuntimeUnavailable
    anything else                                RuntimeDriverError
- `exec()` (exec probes) is `docker exec`, detached and polled; `address()` is the
  container's IP on its network, for probes of a port that is not published.
- Every blocking SDK call runs in a worker thread (`asyncio.to_thread`). The event loop
  never touches the Docker socket.
- `usages()` (for /metrics, at scrape time) reads each container's cgroup files
  (`shoal.agent.runtime.cgroups`), found from the container's main pid that `list()`
  saw. Where they cannot be read (a remote engine, another pid namespace), it falls
  back to the stats API: a daemon thread refreshes those figures at most one batch at a
  time, and a scrape reports the last ones it got (none on the very first).

How the streams work: `logs()` and `changes()` each drain a blocking docker stream in a
daemon thread into an `asyncio.Queue` (a `_Pump`). Leaving the `async for` (break,
cancellation, `close()`) shuts the stream's socket down, which wakes the thread. `logs()`
is bounded: the thread waits while the consumer is slow. `changes()` coalesces: an id
already waiting in the queue is not queued twice. The events thread reconnects with
exponential back-off when the engine goes away, asking for events `since` the last one it
saw, so a short engine restart loses no hint.
"""

from __future__ import annotations

import asyncio
import builtins
import math
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
import structlog
import urllib3.exceptions

from shoal.agent.runtime import cgroups
from shoal.agent.runtime.base import LABEL_PREFIX, Observed, Usage
from shoal.errors import (
    HostPortInUse,
    ImageNotFound,
    NotFound,
    RuntimeDriverError,
    RuntimeUnavailable,
    ShoalError,
)
from shoal.model import Driver, RunSpec

__all__ = [
    "CONTAINER_PREFIX",
    "LABEL_DEPLOYMENT",
    "LABEL_GENERATION",
    "LABEL_HOST_PORT",
    "LABEL_NODE",
    "LABEL_REPLICA",
    "DockerRuntime",
    "container_name",
]

CONTAINER_PREFIX = "shoal-"
LABEL_REPLICA = LABEL_PREFIX + "replica"
LABEL_DEPLOYMENT = LABEL_PREFIX + "deployment"
LABEL_GENERATION = LABEL_PREFIX + "generation"
LABEL_NODE = LABEL_PREFIX + "node"
LABEL_HOST_PORT = LABEL_PREFIX + "host-port"

# The container events that can change what `list()` reports.
_WATCHED_EVENTS = ("start", "die", "oom", "destroy")

# A logs consumer that falls this many chunks behind makes the reading thread wait,
# so a slow reader of a large log does not buffer all of it in memory.
_LOG_QUEUE_CHUNKS = 64

_T = TypeVar("_T")


def container_name(replica_id: str) -> str:
    """The Docker container name of a replica."""
    return CONTAINER_PREFIX + replica_id


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True, kw_only=True)
class _Context:
    """What the call was about, so an error can name it."""

    image: str | None = None
    replica_id: str | None = None
    host_port: int | None = None


@dataclass(frozen=True, slots=True)
class _Rule:
    """One row of the translation table: a predicate and the shoal error it yields."""

    name: str
    matches: Callable[[BaseException], bool]
    build: Callable[[BaseException, _Context], ShoalError]


def _explanation(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def _api_text(exc: BaseException) -> str:
    return _explanation(exc).lower() if isinstance(exc, docker.errors.APIError) else ""


_PORT_IN_USE = ("port is already allocated", "address already in use")
_COMMAND_MISSING = ("executable file not found", "no such file or directory", "permission denied")
_PORT_IN_MESSAGE = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-f:]*\]):(\d{1,5})\b")


def _port_in_use(exc: BaseException, ctx: _Context) -> ShoalError:
    match = _PORT_IN_MESSAGE.search(_explanation(exc))
    port = match.group(1) if match else (str(ctx.host_port) if ctx.host_port else "")
    what = f"host port {port}" if port else "the host port"
    return HostPortInUse(
        f"{what} is already in use on this node, so replica {ctx.replica_id or '?'} cannot "
        f"publish on it (docker: {_explanation(exc)})",
        port=int(port) if port else None,
    )


def _command_missing(exc: BaseException, ctx: _Context) -> ShoalError:
    where = f"image {ctx.image}" if ctx.image else "its container"  # no image: an exec
    return RuntimeDriverError(
        f"replica {ctx.replica_id or '?'}: the command cannot be run in {where} "
        f"(docker: {_explanation(exc)})"
    )


def _not_found(exc: BaseException, ctx: _Context) -> ShoalError:
    if ctx.replica_id:
        return NotFound("replica", ctx.replica_id)
    return NotFound("docker object", _explanation(exc))


def _as_shoal(exc: BaseException) -> ShoalError:
    assert isinstance(exc, ShoalError)
    return exc


def _image_not_found(exc: BaseException, ctx: _Context) -> ShoalError:
    if ctx.image:
        return ImageNotFound(ctx.image)
    match = re.search(r"no such image: (\S+)", _explanation(exc), re.IGNORECASE)
    return ImageNotFound(match.group(1) if match else _explanation(exc))


# Order matters: docker's APIError is also a requests HTTPError (an OSError), and
# ImageNotFound is also a NotFound.
_RULES: tuple[_Rule, ...] = (
    _Rule("shoal", lambda e: isinstance(e, ShoalError), lambda e, c: _as_shoal(e)),
    _Rule(
        "image_not_found",
        lambda e: isinstance(e, docker.errors.ImageNotFound),
        _image_not_found,
    ),
    _Rule("not_found", lambda e: isinstance(e, docker.errors.NotFound), _not_found),
    _Rule(
        "port_in_use",
        lambda e: any(f in _api_text(e) for f in _PORT_IN_USE),
        _port_in_use,
    ),
    _Rule(
        "command_missing",
        lambda e: "oci runtime" in _api_text(e) and any(f in _api_text(e) for f in _COMMAND_MISSING),
        _command_missing,
    ),
    _Rule(
        "api_error",
        lambda e: isinstance(e, docker.errors.APIError),
        lambda e, c: RuntimeDriverError(
            f"Docker Engine refused the request"
            f"{' for replica ' + c.replica_id if c.replica_id else ''}"
            f" ({getattr(e, 'status_code', None) or '?'}): {_explanation(e)}"
        ),
    ),
    _Rule(
        # What docker.from_env() raises when it cannot even ask the engine its version.
        "engine_unreachable",
        lambda e: type(e) is docker.errors.DockerException,
        lambda e, c: RuntimeUnavailable(f"Docker Engine cannot be reached: {e}"),
    ),
    _Rule(
        "docker_client",
        lambda e: isinstance(e, docker.errors.DockerException),
        lambda e, c: RuntimeDriverError(f"docker client error: {e}"),
    ),
    _Rule(
        "timeout",
        lambda e: isinstance(e, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)),
        lambda e, c: RuntimeUnavailable(f"Docker Engine did not answer in time: {e}"),
    ),
    _Rule(
        "connection",
        lambda e: isinstance(
            e,
            (
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                ConnectionError,
            ),
        ),
        lambda e, c: RuntimeUnavailable(f"Docker Engine cannot be reached: {e}"),
    ),
    _Rule(
        "other",
        lambda e: True,
        lambda e, c: RuntimeDriverError(f"docker driver failed: {type(e).__name__}: {e}"),
    ),
)


def _match(exc: BaseException) -> _Rule:
    """The first rule of `_RULES` that applies to `exc` (the last one always does)."""
    return next(rule for rule in _RULES if rule.matches(exc))


def _translate(
    exc: BaseException,
    *,
    image: str | None = None,
    replica_id: str | None = None,
    host_port: int | None = None,
) -> ShoalError:
    """The shoal error for a docker SDK, requests or OS error: the one mapping."""
    ctx = _Context(image=image, replica_id=replica_id, host_port=host_port)
    return _match(exc).build(exc, ctx)


# --------------------------------------------------------------------- inspect data


def _parse_docker_time(value: str | None) -> float | None:
    """Unix seconds from Docker's RFC 3339 nanosecond timestamps; None for "never"."""
    if not value or value.startswith("0001-01-01"):
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value)
    if m is None:
        return None
    offset = "+00:00" if m.group(3) == "Z" else m.group(3)
    whole = datetime.fromisoformat(m.group(1) + offset).timestamp()
    return whole + (float("0." + m.group(2)) if m.group(2) else 0.0)


def _docker_timestamp(ns: int) -> str:
    """Unix nanoseconds as the `since` filter wants them: "<seconds>.<nanoseconds>"."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _usage_from_stats(stats: dict[str, Any]) -> Usage | None:
    """A `Usage` from one stats API answer (cgroup v1 or v2 keys), None when it has none."""
    cpu = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
    memory = stats.get("memory_stats") or {}
    if cpu is None or "usage" not in memory:
        return None
    detail = memory.get("stats") or {}
    inactive = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    return Usage(cpu_seconds=int(cpu) / 1e9, memory_bytes=max(0, int(memory["usage"]) - int(inactive)))


def _observed(info: dict[str, Any]) -> Observed | None:
    """An `Observed` from `docker inspect` data; None for a container shoal did not label."""
    labels: dict[str, str] = (info.get("Config") or {}).get("Labels") or {}
    replica_id = labels.get(LABEL_REPLICA)
    if not replica_id:
        return None
    state: dict[str, Any] = info.get("State") or {}
    running = bool(state.get("Running"))
    status = state.get("Status", "")
    never_started = status == "created"
    exit_code = None if running or never_started else _int_or_none(state.get("ExitCode"))
    error = ""
    if not running:
        if state.get("Error"):
            error = str(state["Error"])
        elif state.get("OOMKilled"):
            error = f"killed: out of memory (exit code {exit_code})"
        elif never_started:
            error = "created but never started"
        elif exit_code is not None:
            error = f"exited with code {exit_code}"
    return Observed(
        replica_id=replica_id,
        deployment=labels.get(LABEL_DEPLOYMENT, ""),
        generation=_int_or_none(labels.get(LABEL_GENERATION)) or 0,
        driver=Driver.DOCKER,
        handle=str(info.get("Id", "")),
        running=running,
        exit_code=exit_code,
        started_at=_parse_docker_time(state.get("StartedAt")),
        host_port=_int_or_none(labels.get(LABEL_HOST_PORT)),
        error=error,
    )


# -------------------------------------------------------------------------- streams


class _Pump:
    """A blocking stream drained by one worker thread into an asyncio queue.

    Messages are `(kind, value)` with kind "item", "error" or "end". The queue itself is
    unbounded so that "error" and "end" always get through; with a `window`, the thread
    waits in `put()` while that many items are unread. `cancel()` may be called from any
    thread: it closes the current stream, which wakes a thread blocked reading it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int | None = None) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._credits = threading.Semaphore(window) if window else None
        self._pending: set[Any] = set()  # coalescing for offer(); loop thread only

    def attach(self, stream: Any) -> bool:
        """Make `stream` the one `cancel()` closes; False (and closed) if already cancelled."""
        with self._lock:
            if not self.stopped.is_set():
                self._stream = stream
                return True
        _close_quietly(stream)
        return False

    def detach(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            _close_quietly(stream)

    def cancel(self) -> None:
        self.stopped.set()
        self.detach()

    # thread side

    def put(self, value: Any) -> bool:
        """Queue an item, waiting while the window is full; False once cancelled."""
        if self._credits is not None:
            while not self._credits.acquire(timeout=0.2):
                if self.stopped.is_set():
                    return False
        if self.stopped.is_set():
            return False
        self._send(("item", value))
        return True

    def offer(self, value: Any) -> None:
        """Queue an item unless an equal one is still unread (never waits)."""
        self._call(self._offer, value)

    def fail(self, exc: BaseException) -> None:
        self._send(("error", exc))

    def finish(self) -> None:
        self._send(("end", None))

    def _send(self, message: tuple[str, Any]) -> None:
        self._call(self.queue.put_nowait, message)

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: no one is listening any more
            pass

    # loop side

    def _offer(self, value: Any) -> None:
        if value not in self._pending:
            self._pending.add(value)
            self.queue.put_nowait(("item", value))

    def taken(self, value: Any) -> None:
        """`value` left the queue: an equal offer counts again, and the window moves."""
        self._pending.discard(value)
        if self._credits is not None:
            self._credits.release()


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - closing a dead socket may fail in many ways
        pass


# -------------------------------------------------------------------------- runtime


class DockerRuntime:
    """Runs replicas as containers on the local Docker Engine; see the module docstring."""

    driver: Driver

    def __init__(
        self,
        node_name: str,
        *,
        client: docker.DockerClient | None = None,
        logger: Any = None,
        events_backoff: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        """`events_backoff`: first and longest wait (seconds) before reconnecting the
        events stream; doubles per failed attempt, so an engine restart is caught within
        a few seconds without a tight loop while it is down."""
        self.driver = Driver.DOCKER
        self.node_name = node_name
        self._client_obj = client
        self._owns_client = client is None
        self._client_lock = threading.Lock()
        self._log = logger if logger is not None else structlog.get_logger()
        self._events_backoff = events_backoff
        self._closed = threading.Event()
        self._pumps: set[_Pump] = set()
        self._threads: set[threading.Thread] = set()
        self._ncpu: int | None = None
        # For usages(): the main pid of each running container (container id → pid) as
        # the last list() saw it; each container's cgroup files (None: not readable
        # here, use the stats API); the stats API's last figures, and whether a refresh
        # is under way.
        self._pids: dict[str, int] = {}
        self._cgroups: dict[str, cgroups.CgroupFiles | None] = {}
        self._stats: dict[str, Usage] = {}
        self._stats_busy = threading.Event()

    # -- plumbing

    def _client_sync(self) -> docker.DockerClient:
        with self._client_lock:
            if self._closed.is_set():
                raise RuntimeDriverError("the docker driver is closed")
            if self._client_obj is None:
                self._client_obj = docker.from_env()
            return self._client_obj

    async def _call(self, ctx: _Context, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking SDK call in a thread, translating its errors."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error goes through the one mapping
            raise _translate(
                exc, image=ctx.image, replica_id=ctx.replica_id, host_port=ctx.host_port
            ) from exc

    async def _api(self) -> Any:
        client = await self._call(_Context(), self._client_sync)
        return client.api

    # -- Runtime protocol

    async def list(self) -> list[Observed]:
        """Every container labelled with this node's name, running or not."""
        api = await self._api()

        def collect() -> list[Observed]:
            found: list[Observed] = []
            pids: dict[str, int] = {}
            summaries = api.containers(all=True, filters={"label": [f"{LABEL_NODE}={self.node_name}"]})
            for summary in summaries:
                try:
                    info = api.inspect_container(summary["Id"])
                except docker.errors.NotFound:  # removed between the list and the inspect
                    continue
                observed = _observed(info)
                if observed is not None:
                    found.append(observed)
                    pid = _int_or_none((info.get("State") or {}).get("Pid"))
                    if observed.running and pid:
                        pids[observed.handle] = pid
            self._pids = pids
            return found

        return await self._call(_Context(), collect)

    async def start(self, spec: RunSpec) -> Observed:
        """Create and start `shoal-<replica_id>`, replacing any container of that name."""
        if spec.driver is not Driver.DOCKER:
            raise RuntimeDriverError(
                f"replica {spec.replica_id} asks for the {spec.driver.value} driver, not docker"
            )
        ctx = _Context(image=spec.image, replica_id=spec.replica_id, host_port=spec.host_port)
        api = await self._api()
        name = container_name(spec.replica_id)
        await self._remove(api, name, ctx)
        create_kwargs = await self._create_kwargs(api, spec)
        try:
            created = await self._call(ctx, api.create_container, **create_kwargs)
        except ImageNotFound:
            await self._pull(spec.image, ctx)
            created = await self._call(ctx, api.create_container, **create_kwargs)
        container_id = str(created["Id"])
        try:
            await self._call(ctx, api.start, container_id)
        except ShoalError as exc:
            # A container that could not start (port taken, bad command) is not left
            # behind: the caller gets the error and decides whether to try again.
            self._log.warning("runtime.container_start_failed", replica=spec.replica_id, error=str(exc))
            await self._remove(api, container_id, ctx)
            raise
        info = await self._call(ctx, api.inspect_container, container_id)
        observed = _observed(info)
        assert observed is not None  # we labelled it a moment ago
        self._log.info(
            "runtime.container_started",
            replica=spec.replica_id,
            container=container_id[:12],
            image=spec.image,
            host_port=spec.host_port,
            node=self.node_name,
        )
        return observed

    async def stop(self, replica_id: str, *, timeout: float = 10.0) -> None:
        """Stop (SIGTERM, SIGKILL after `timeout`) and remove; already gone is fine."""
        ctx = _Context(replica_id=replica_id)
        api = await self._api()
        name = container_name(replica_id)
        try:
            # Docker takes whole seconds; round up so a replica gets at least `timeout`.
            await self._call(ctx, api.stop, name, timeout=max(0, math.ceil(timeout)))
        except NotFound:
            pass
        await self._remove(api, name, ctx)
        self._log.info("runtime.container_stopped", replica=replica_id, node=self.node_name)

    async def exec(self, replica_id: str, command: Sequence[str], timeout: float) -> int:
        """`docker exec` of `command` in the replica's container; its exit status.

        Started detached and polled with `exec_inspect` (every 10 ms, backing off to
        200 ms), so no worker thread waits on a command that hangs. Docker cannot kill an
        exec'd process, so one that overstays `timeout` is left to finish on its own.
        """
        if not command:
            raise RuntimeDriverError(f"replica {replica_id}: an exec probe needs a command")
        ctx = _Context(replica_id=replica_id)
        api = await self._api()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        created = await self._call(
            ctx, api.exec_create, container_name(replica_id), list(command), stdout=False, stderr=False
        )
        exec_id = str(created["Id"])
        await self._call(ctx, api.exec_start, exec_id, detach=True)
        delay = 0.01
        while True:
            info = await self._call(ctx, api.exec_inspect, exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RuntimeDriverError(
                    f'replica {replica_id}: "{command[0]}" did not finish within {timeout:g} s'
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.2)

    async def address(self, replica_id: str, container_port: int) -> tuple[str, int]:
        """The container's own IP address (the host reaches it over the bridge) and the
        port as written; loopback for a container on the host's network."""
        ctx = _Context(replica_id=replica_id)
        api = await self._api()
        info = await self._call(ctx, api.inspect_container, container_name(replica_id))
        settings: dict[str, Any] = info.get("NetworkSettings") or {}
        ip = settings.get("IPAddress") or next(
            (n.get("IPAddress") for n in (settings.get("Networks") or {}).values() if n.get("IPAddress")), ""
        )
        if not ip:
            if (info.get("HostConfig") or {}).get("NetworkMode") == "host":
                return ("127.0.0.1", container_port)
            raise RuntimeDriverError(f"replica {replica_id}: its container has no IP address to probe")
        return (str(ip), container_port)

    async def logs(
        self, replica_id: str, *, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[bytes]:
        """Chunks of the container's stdout and stderr; follows until cancelled or closed."""
        ctx = _Context(replica_id=replica_id)
        api = await self._api()
        name = container_name(replica_id)

        def open_stream() -> Any:
            return api.logs(
                name,
                stdout=True,
                stderr=True,
                stream=True,
                follow=follow,
                tail=tail if tail is not None else "all",
            )

        pump = _Pump(asyncio.get_running_loop(), window=_LOG_QUEUE_CHUNKS)

        def drain() -> None:
            try:
                stream = open_stream()
                if pump.attach(stream):
                    for chunk in stream:
                        if not pump.put(chunk):
                            break
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                pump.fail(exc)
            finally:
                pump.detach()
                pump.finish()

        async with aclosing(self._consume(pump, drain, f"shoal-logs-{replica_id}", ctx)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def changes(self) -> AsyncIterator[str]:
        """Replica ids from the engine's container events for this node, until `close()`."""
        if self._closed.is_set():
            return
        pump = _Pump(asyncio.get_running_loop())
        ctx = _Context()
        # Events count from this call on, even those before the stream is connected.
        since = _docker_timestamp(time.time_ns())
        events = self._consume(pump, lambda: self._watch_events(pump, since), "shoal-docker-events", ctx)
        async with aclosing(events) as replica_ids:
            async for replica_id in replica_ids:
                yield replica_id

    def usages(self, replicas: Sequence[Observed]) -> dict[str, Usage]:
        """CPU time and working-set memory of the running containers given, from their
        cgroups (or the stats API's last figures); see the module docstring."""
        out: dict[str, Usage] = {}
        known: dict[str, cgroups.CgroupFiles | None] = {}
        slow: builtins.list[str] = []
        for o in replicas:
            if not o.running or not o.handle:
                continue
            if o.handle in self._cgroups:
                files = self._cgroups[o.handle]
            else:
                pid = self._pids.get(o.handle)
                if pid is None:
                    continue  # started since the last list(): next scrape
                files = cgroups.locate(pid, expect=o.handle)
            known[o.handle] = files
            got = cgroups.read(files) if files is not None else None
            if got is not None:
                out[o.replica_id] = Usage(cpu_seconds=got[0], memory_bytes=got[1])
                continue
            slow.append(o.handle)
            if o.handle in self._stats:
                out[o.replica_id] = self._stats[o.handle]
        # Only containers still running keep an entry: nothing outlives a replica.
        self._cgroups = known
        self._stats = {h: u for h, u in self._stats.items() if h in known}
        if slow and not self._stats_busy.is_set() and not self._closed.is_set():
            self._stats_busy.set()
            threading.Thread(target=self._refresh_stats, args=(slow,), name="shoal-docker-stats", daemon=True).start()
        return out

    def _refresh_stats(self, handles: Sequence[str]) -> None:
        """Stats thread: one stats API call per container, each ~0.1-2 s."""
        try:
            api = self._client_sync().api
            fresh = dict(self._stats)
            for handle in handles:
                try:
                    stats = api.stats(handle, stream=False, one_shot=True)
                    usage = _usage_from_stats(stats)
                except Exception:  # noqa: BLE001 - gone, or an engine hiccup: no figure this time
                    continue
                if usage is not None:
                    fresh[handle] = usage
            # Only what a scrape still asks about: a container removed meanwhile is gone.
            self._stats = {h: u for h, u in fresh.items() if h in self._cgroups}
        except Exception as exc:  # noqa: BLE001 - metrics must never take the driver down
            self._log.debug("runtime.docker_stats_failed", error=str(exc))
        finally:
            self._stats_busy.clear()

    async def close(self) -> None:
        """Stop the stream threads and close the client; containers keep running."""
        self._closed.set()
        for pump in list(self._pumps):
            pump.cancel()
        threads = list(self._threads)

        def join() -> None:
            for thread in threads:
                thread.join(timeout=5.0)

        await asyncio.to_thread(join)
        with self._client_lock:
            client = self._client_obj
        if client is not None and self._owns_client:
            await asyncio.to_thread(client.close)

    # -- helpers

    async def _consume(
        self, pump: _Pump, target: Callable[[], None], thread_name: str, ctx: _Context
    ) -> AsyncGenerator[Any, None]:
        """Run `target` in a daemon thread and yield what it pumps, until "end"."""
        thread = threading.Thread(target=target, name=thread_name, daemon=True)
        self._pumps.add(pump)
        self._threads.add(thread)
        thread.start()
        try:
            while True:
                kind, value = await pump.queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise _translate(
                        value, image=ctx.image, replica_id=ctx.replica_id, host_port=ctx.host_port
                    ) from value
                pump.taken(value)
                yield value
        finally:
            pump.cancel()
            self._pumps.discard(pump)
            self._threads.discard(thread)

    def _watch_events(self, pump: _Pump, since: str) -> None:
        """Events thread: stream container events, reconnecting with back-off.

        `since` moves to each event's time, so a reconnect asks for what it missed;
        replaying one event twice is harmless, a change is only a hint.
        """
        first, longest = self._events_backoff
        backoff = first
        connected_before = False
        filters = {
            "type": ["container"],
            "event": list(_WATCHED_EVENTS),
            "label": [f"{LABEL_NODE}={self.node_name}"],
        }
        try:
            while not (pump.stopped.is_set() or self._closed.is_set()):
                try:
                    client = self._client_sync()
                    stream = client.api.events(decode=True, filters=filters, since=since)
                except Exception as exc:  # noqa: BLE001 - logged, then retried
                    if pump.stopped.is_set() or self._closed.is_set():
                        break
                    self._log.warning(
                        "runtime.events_unavailable", error=str(_translate(exc)), retry_in=backoff
                    )
                    pump.stopped.wait(backoff)
                    backoff = min(backoff * 2, longest)
                    continue
                if not pump.attach(stream):
                    break
                if connected_before:
                    self._log.info("runtime.events_reconnected", node=self.node_name)
                connected_before = True
                backoff = first
                try:
                    for event in stream:
                        event_ns = _int_or_none(event.get("timeNano"))
                        if event_ns is not None:
                            since = _docker_timestamp(event_ns)
                        attributes = (event.get("Actor") or {}).get("Attributes") or {}
                        replica_id = attributes.get(LABEL_REPLICA)
                        if replica_id:
                            pump.offer(replica_id)
                except Exception as exc:  # noqa: BLE001 - a broken stream is reconnected
                    self._log.warning("runtime.events_stream_failed", error=str(_translate(exc)))
                finally:
                    pump.detach()
                if pump.stopped.is_set():
                    break
                # The engine closed the stream: it is restarting or gone.
                self._log.warning("runtime.events_disconnected", node=self.node_name, retry_in=backoff)
                pump.stopped.wait(backoff)
                backoff = min(backoff * 2, longest)
        finally:
            pump.finish()

    async def _create_kwargs(self, api: Any, spec: RunSpec) -> dict[str, Any]:
        labels = {
            LABEL_REPLICA: spec.replica_id,
            LABEL_DEPLOYMENT: spec.deployment,
            LABEL_GENERATION: str(spec.generation),
            LABEL_NODE: self.node_name,
        }
        if spec.host_port is not None:
            labels[LABEL_HOST_PORT] = str(spec.host_port)
        host_config: dict[str, Any] = {}
        ports: list[tuple[int, str]] | None = None
        if spec.container_port is not None and spec.host_port is not None:
            ports = [(spec.container_port, "tcp")]
            host_config["port_bindings"] = {f"{spec.container_port}/tcp": spec.host_port}
        if spec.limits.cpu_millis is not None:
            host_config["nano_cpus"] = await self._nano_cpus(api, spec.limits.cpu_millis)
        if spec.limits.memory_bytes is not None:
            host_config["mem_limit"] = spec.limits.memory_bytes
        kwargs: dict[str, Any] = {
            "image": spec.image,
            "name": container_name(spec.replica_id),
            "labels": labels,
            # Like a Kubernetes pod: the hostname is the replica's name, and the replica
            # knows its own id (the process driver sets the same variable).
            "hostname": spec.replica_id[:63],
            "environment": [f"{k}={v}" for k, v in spec.env] + [f"SHOAL_REPLICA={spec.replica_id}"],
            "host_config": api.create_host_config(**host_config),
            "detach": True,
        }
        if ports:
            kwargs["ports"] = ports
        if spec.command:
            kwargs["entrypoint"] = list(spec.command)
        if spec.args:
            kwargs["command"] = list(spec.args)
        return kwargs

    async def _nano_cpus(self, api: Any, cpu_millis: int) -> int:
        """CPU limit in Docker's unit, capped at the engine's CPU count.

        Docker refuses a limit above the host's CPUs, while Kubernetes accepts one (it
        is then no limit at all); capping keeps the manifest portable across hosts.
        """
        if self._ncpu is None:
            info = await self._call(_Context(), api.info)
            self._ncpu = int(info.get("NCPU") or 0) or None
        wanted = cpu_millis * 1_000_000
        if self._ncpu is not None and wanted > self._ncpu * 1_000_000_000:
            self._log.info("runtime.cpu_limit_capped", cpu_millis=cpu_millis, host_cpus=self._ncpu)
            return self._ncpu * 1_000_000_000
        return wanted

    async def _pull(self, image: str, ctx: _Context) -> None:
        self._log.info("runtime.image_pull", image=image)
        client = await self._call(ctx, self._client_sync)
        try:
            await asyncio.to_thread(client.images.pull, image)
        except Exception as exc:  # noqa: BLE001 - any pull failure means "no such image"
            translated = _translate(exc, image=image, replica_id=ctx.replica_id)
            self._log.warning("runtime.image_pull_failed", image=image, error=str(translated))
            if isinstance(translated, RuntimeUnavailable):
                raise translated from exc
            raise ImageNotFound(image) from exc

    async def _remove(self, api: Any, name: str, ctx: _Context) -> None:
        """Force-remove a container; gone already, or going, is fine."""
        try:
            await self._call(ctx, api.remove_container, name, force=True)
        except NotFound:
            pass
        except RuntimeDriverError as exc:
            if "already in progress" not in str(exc):
                raise
