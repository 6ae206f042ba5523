"""Probe executors and the loop that drives one replica's probes (the shell around
`shoal.agent.probe_state`).

Rules:
- Four executors, Kubernetes semantics, each bounded by the probe's `timeout_seconds`
  and each returning a `ProbeResult`, never raising (a probe that cannot run fails):
    http  GET `path` over a fresh HTTP/1.1 connection (`Connection: close`); a status
          of 200-399 passes. Redirects are not followed (a 3xx passes, as in
          Kubernetes); the body is not read.
    tcp   a TCP connection is accepted.
    exec  the runtime runs the command as the replica would (`Runtime.exec`); exit
          status 0 passes.
    grpc  `grpc.health.v1.Health/Check` for `service`; SERVING passes.
- Where a network probe goes (`ProbeExecutor.address`): a replica is published on one
  host port, mapped to its first container port. A probe of that container port (or
  one that names no port) goes to the host port on the agent's advertise address: the
  very address its endpoint has in every balancing table, so a passing probe means
  the proxy can reach it. A probe of any other container port goes where the runtime
  says that port is reachable from this host (`Runtime.address`): the container's own
  IP for Docker, loopback for a process (which listens on the host, port as written).
- `run_probes` launches what the state machine says is due, feeds results back as they
  come, and hands every change to the caller, in order, before it looks at anything
  else. Cancelling it cancels the probes in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import shoal
from shoal.agent.probe_state import Change, ReplicaProbes, Role
from shoal.agent.runtime.base import Runtime
from shoal.errors import ConfigError, ShoalError
from shoal.model import Probe, ProbeKind, RunSpec

__all__ = [
    "ProbeResult",
    "ProbeExecutor",
    "http_get",
    "tcp_connect",
    "grpc_health",
    "exec_command",
    "run_probes",
]

_USER_AGENT = f"shoal-probe/{shoal.__version__}"

# Grace on top of a probe's own timeout before the executor gives up on it from the
# outside; each executor enforces the timeout itself, this only bounds a bug.
_BACKSTOP = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """One probe run: passed or not, and why (for events and logs)."""

    ok: bool
    message: str = ""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_reason(exc: OSError) -> str:
    # asyncio's connect errors carry "Connect call failed (...)" as their strerror;
    # the errno says it better ("Connection refused").
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


async def http_get(host: str, port: int, path: str, timeout: float) -> ProbeResult:
    """GET `path` on host:port; 200-399 passes."""
    target = urllib.parse.quote(path or "/", safe="/?&=%:@!$'()*+,;~-._")
    what = f"HTTP GET http://{_hostport(host, port)}{target}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {_hostport(host, port)}\r\nUser-Agent: {_USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return ProbeResult(ok=False, message=f"{what}: no answer within {timeout:g} s")
    except OSError as exc:
        return ProbeResult(ok=False, message=f"{what}: {_os_reason(exc)}")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        shown = status_line[:60].decode("latin-1").strip() or "the connection was closed"
        return ProbeResult(ok=False, message=f"{what}: not an HTTP response ({shown})")
    status = int(parts[1])
    if 200 <= status < 400:
        return ProbeResult(ok=True, message=f"{what}: status {status}")
    return ProbeResult(ok=False, message=f"{what}: status {status}")


async def tcp_connect(host: str, port: int, timeout: float) -> ProbeResult:
    """A TCP connection to host:port is accepted."""
    what = f"TCP connect to {_hostport(host, port)}"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return ProbeResult(ok=False, message=f"{what}: no answer within {timeout:g} s")
    except OSError as exc:
        return ProbeResult(ok=False, message=f"{what}: {_os_reason(exc)}")
    writer.close()
    return ProbeResult(ok=True, message=f"{what}: accepted")


async def grpc_health(host: str, port: int, service: str, timeout: float) -> ProbeResult:
    """`grpc.health.v1.Health/Check` on host:port; SERVING passes."""
    what = f"gRPC health check of {service or 'the server'} at {_hostport(host, port)}"
    # A fresh channel per probe, as Kubernetes does: a probe must see what a new client
    # sees, not a connection kept alive by the last probe. No proxy, no retries.
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    try:
        async with grpc.aio.insecure_channel(_hostport(host, port), options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {timeout:g} s"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            reason = "the server does not implement grpc.health.v1"
        elif code == grpc.StatusCode.NOT_FOUND:
            reason = f'the server does not know the service "{service}"'
        else:
            reason = f"{code.name}: {exc.details() or ''}".rstrip(": ")
        return ProbeResult(ok=False, message=f"{what}: {reason}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return ProbeResult(ok=response.status == health_pb2.HealthCheckResponse.SERVING, message=f"{what}: {status}")


async def exec_command(runtime: Runtime, replica_id: str, command: Sequence[str], timeout: float) -> ProbeResult:
    """`command` through the replica's runtime; exit status 0 passes."""
    what = f'exec "{" ".join(command)}"'
    try:
        code = await runtime.exec(replica_id, command, timeout)
    except ShoalError as exc:
        return ProbeResult(ok=False, message=f"{what}: {exc}")
    if code == 0:
        return ProbeResult(ok=True, message=f"{what}: exit status 0")
    return ProbeResult(ok=False, message=f"{what}: exit status {code}")


class ProbeExecutor:
    """Runs the probes of one replica incarnation, against where it listens."""

    def __init__(self, spec: RunSpec, runtime: Runtime, advertise_address: str) -> None:
        self.spec = spec
        self.runtime = runtime
        self.advertise_address = advertise_address
        # A port's direct address does not change while the incarnation lives.
        self._direct: dict[int, tuple[str, int]] = {}

    async def address(self, probe: Probe) -> tuple[str, int]:
        """Where a network probe of `probe.port` goes; see the module docstring."""
        spec = self.spec
        port = probe.port or spec.container_port
        if port is None:
            raise ConfigError(f"the {probe.kind.value} probe names no port and the container has none")
        if spec.host_port is not None and port == spec.container_port:
            return (self.advertise_address, spec.host_port)
        if port not in self._direct:
            self._direct[port] = await self.runtime.address(spec.replica_id, port)
        return self._direct[port]

    async def run(self, probe: Probe) -> ProbeResult:
        """One run of `probe`; never raises (but can be cancelled)."""
        timeout = probe.timeout_seconds
        try:
            async with asyncio.timeout(timeout + _BACKSTOP):
                if probe.kind is ProbeKind.EXEC:
                    return await exec_command(self.runtime, self.spec.replica_id, probe.command, timeout)
                host, port = await self.address(probe)
                if probe.kind is ProbeKind.HTTP:
                    return await http_get(host, port, probe.path, timeout)
                if probe.kind is ProbeKind.TCP:
                    return await tcp_connect(host, port, timeout)
                return await grpc_health(host, port, probe.service, timeout)
        except TimeoutError:
            return ProbeResult(ok=False, message=f"{probe.kind.value} probe: no answer within {timeout:g} s")
        except ShoalError as exc:
            return ProbeResult(ok=False, message=f"{probe.kind.value} probe: {exc}")


OnChanges = Callable[[Role, ProbeResult, tuple[Change, ...]], Awaitable[None]]


async def run_probes(
    machine: ReplicaProbes,
    run: Callable[[Probe], Coroutine[Any, Any, ProbeResult]],
    on_changes: OnChanges,
    *,
    clock: Callable[[], float],
) -> None:
    """Drive `machine` until it is finished (a restart was asked for) or cancelled.

    `run` executes one probe; `on_changes(role, result, changes)` is awaited for every
    result that changed something, before the next launch.
    """
    inflight: dict[asyncio.Task[ProbeResult], Role] = {}
    try:
        while not machine.failed:
            for role in machine.tick(clock()):
                task = asyncio.create_task(run(machine.probe(role)), name=f"probe-{role.value}")
                inflight[task] = role
            deadline = machine.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - clock())
            if not inflight:
                if timeout is None:
                    return  # nothing configured can ever run
                await asyncio.sleep(timeout)
                continue
            done, _ = await asyncio.wait(inflight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            # Results that arrive together are taken in a fixed order (startup, liveness,
            # readiness), so a run does not depend on which task the loop saw first.
            for task in sorted(done, key=lambda t: list(Role).index(inflight[t])):
                role = inflight.pop(task)
                result = task.result()
                changes = machine.observe(role, result.ok, clock(), result.message)
                if changes:
                    await on_changes(role, result, changes)
    finally:
        for task in inflight:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*inflight, return_exceptions=True)
