"""Real agent processes for end-to-end tests: start, kill -9, restart, clean up.

`DevAgent` runs `python -m shoal agent --dev` (or, with `mode`, a `--server` of a
multi-server cluster on loopback) as a subprocess with its own data dir, gRPC port and
node name (so its containers are told apart from anyone else's), and drives the CLI as
a user would. Teardown removes every container and process it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import free_port, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class CliResult:
    code: int
    out: str
    err: str


def json_items(r: CliResult, what: str) -> list[dict[str, Any]]:
    """The objects a `shoal ... -o json` printed: one object, or {"items": [...]}."""
    if r.code != 0:
        raise AssertionError(f"shoal {what} failed: {r.err.strip()}")
    if not r.out.strip():
        return []
    data = json.loads(r.out)
    return list(data["items"]) if "items" in data else [data]


@dataclass
class DevAgent:
    data_dir: pathlib.Path
    grpc_port: int = field(default_factory=free_port)
    gossip_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    node: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}")
    proc: subprocess.Popen[bytes] | None = None
    log_path: pathlib.Path | None = None
    extra_args: tuple[str, ...] = ()
    mode: tuple[str, ...] = ("--dev",)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> float:
        """Start the agent; returns seconds until its gRPC health check said SERVING
        (with `wait=False`, returns at once: call `wait_serving`)."""
        self.log_path = self.data_dir / "agent.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal", "agent", *self.mode, "--data-dir", str(self.data_dir),
             "--grpc-port", str(self.grpc_port), "--gossip-port", str(self.gossip_port),
             "--metrics-port", str(self.metrics_port), "--node-name", self.node, "--seed", "7",
             "--config", "/dev/null", *self.extra_args],  # never a host's /etc/shoal/agent.yaml
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        log.close()
        if wait:
            self.wait_serving(timeout)
        return time.monotonic() - t0

    def wait_serving(self, timeout: float = 30.0) -> None:
        try:
            wait_until(self._serving, timeout, what=f"agent {self.node} to serve")
        except AssertionError:
            raise AssertionError(f"agent did not start; log:\n{self.log()}") from None

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}; log:\n{self.log()}")
        with grpc.insecure_channel(self.addr) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            except grpc.RpcError:
                return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def cli(self, *args: str, input: str | None = None, timeout: float = 60.0) -> CliResult:
        env = dict(os.environ, SHOAL_ADDR=self.addr, COLUMNS="200")
        p = subprocess.run([sys.executable, "-m", "shoal", *args], input=input, capture_output=True,
                           text=True, env=env, timeout=timeout, cwd=ROOT)
        return CliResult(p.returncode, p.stdout, p.stderr)

    def get_json(self, kind: str) -> list[dict[str, Any]]:
        return json_items(self.cli("get", kind, "-o", "json"), f"get {kind}")

    def cleanup_workloads(self) -> None:
        """Remove every container and process this agent's node made."""
        with contextlib.suppress(Exception):
            import docker

            client = docker.from_env()
            for c in client.containers.list(all=True, filters={"label": f"io.shoal.node={self.node}"}):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
            client.close()
        procs = self.data_dir / "processes"
        for state in procs.glob("*.json") if procs.exists() else []:
            with contextlib.suppress(Exception):
                pid = int(json.loads(state.read_text())["pid"])
                os.killpg(pid, signal.SIGKILL)


def whoami_deployment(whoami: pathlib.Path, name: str, replicas: int, *, placement: str = "") -> str:
    """A Deployment of `replicas` whoami processes (the process driver, container port
    8080, answering with their replica id), the workload most end-to-end tests run."""
    return process_deployment(name, replicas, "whoami", [str(whoami)], port=8080, placement=placement)


def process_deployment(name: str, replicas: int, container: str, command: list[str], *,
                       port: int | None = None, placement: str = "") -> str:
    """A Deployment of `replicas` copies of `command` on the process driver, pods
    labelled app=`name`, with a container port when `port` is given."""
    annotations = "    shoal.io/driver: process\n" + (f"    shoal.io/placement: {placement}\n" if placement else "")
    # JSON strings are YAML double-quoted strings: any command line survives.
    ports = f"        ports:\n        - containerPort: {port}\n" if port is not None else ""
    return f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  annotations:
{annotations}spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: {container}
        command: {json.dumps(command)}
{ports}"""


def service_manifest(name: str, port: int, *, balance: str = "") -> str:
    """A Service `name` on `port` in front of the pods labelled app=`name` (port 8080)."""
    annotations = f"  annotations:\n    shoal.io/balance: {balance}\n" if balance else ""
    return f"""\
apiVersion: v1
kind: Service
metadata:
  name: {name}
{annotations}spec:
  selector: {{app: {name}}}
  ports:
  - port: {port}
    targetPort: 8080
"""


def http_get(port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 2.0) -> str:
    """One HTTP/1.0 request on a new connection; returns the body."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ConnectionError(f"not an HTTP response: {data[:80]!r}")
    return body.decode()
