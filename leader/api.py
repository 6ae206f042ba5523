"""The `Control` gRPC service: the user-facing API, on top of the store.

Rules:
- An apply is validated whole before anything is written: every manifest problem goes
  back at once (INVALID_ARGUMENT, one problem per line), and a rejected apply changes
  nothing. An accepted apply is one store transaction.
- Errors cross the edge through `_STATUS` (one mapping from `ShoalError` to gRPC codes);
  anything unexpected is INTERNAL with a sentence, never a traceback to the client.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import structlog

from shoal.errors import (
    Conflict,
    ConfigError,
    ManifestError,
    ManifestProblem,
    NotFound,
    RuntimeDriverError,
    ShoalError,
    StoreError,
    Unavailable,
    Unschedulable,
)
from shoal.leader import convert
from shoal.leader.controller import Controller
from shoal.leader.records import DeploymentRecord, NodeRecord, ReplicaRecord, ServiceRecord, TableRecord
from shoal.leader.scheduler import Scheduler
from shoal.leader.state import ClusterState, Delete, NewEvent, Put, Txn
from shoal.leader.store import Store
from shoal.manifest import MAX_DOCUMENT_BYTES, Document, parse_text
from shoal.model import DeploymentSpec
from shoal.table_feed import TableFeed, watch_table
from shoal.v1 import control_pb2, control_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from shoal.leader.server import ServerRole

__all__ = ["ControlService", "LogSource", "status_for", "KIND_ALIASES"]

# What a pod's logs come from: given the replica, an async iterator of output chunks.
LogSource = Callable[[ReplicaRecord, bool, int], AsyncIterator[bytes]]

KIND_ALIASES = {
    "deployments": "deployments", "deployment": "deployments", "deploy": "deployments",
    "services": "services", "service": "services", "svc": "services",
    "pods": "pods", "pod": "pods", "po": "pods",
    "endpoints": "endpoints", "endpoint": "endpoints", "ep": "endpoints",
    "nodes": "nodes", "node": "nodes", "no": "nodes",
    "events": "events", "event": "events", "ev": "events",
}

_STATUS: dict[type[ShoalError], grpc.StatusCode] = {
    ManifestError: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    Unschedulable: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RuntimeDriverError: grpc.StatusCode.UNAVAILABLE,
    StoreError: grpc.StatusCode.UNAVAILABLE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: ShoalError) -> grpc.StatusCode:
    """The gRPC status code for a shoal error (the most specific class wins)."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]  # type: ignore[index]
    return grpc.StatusCode.UNKNOWN


class _InvalidRequest(ShoalError):
    """A request field is out of range."""


_STATUS[_InvalidRequest] = grpc.StatusCode.INVALID_ARGUMENT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _edge(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: ControlService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except ShoalError as exc:
            await context.abort(status_for(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            # A bug, not a user error: the log gets the traceback, the client a sentence.
            self._log.exception("api.internal_error", method=fn.__name__, error=repr(exc))
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error in {fn.__name__} ({type(exc).__name__}); see the server log")

    return wrapper  # type: ignore[return-value]


def _on_leader(fn: F) -> F:
    """Leader-only work (every write): a follower forwards the request to the leader."""

    @functools.wraps(fn)
    async def wrapper(self: ControlService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._cluster is not None and not self._cluster.is_leader():
            answer = await self._cluster.forward(fn.__name__, request, context)
            if answer is not None:
                return answer
        return await fn(self, request, context)

    return wrapper  # type: ignore[return-value]


def _template_key(spec: DeploymentSpec) -> tuple[Any, ...]:
    """What, when it changes, makes replicas roll over to a new template generation."""
    return (spec.container, spec.template_labels, spec.driver, spec.node_selector)


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(
        self,
        store: Store,
        controller: Controller,
        *,
        log_source: LogSource | None = None,
        members: Callable[[], list[Any]] | None = None,
        cluster: ServerRole | None = None,
        clock: Callable[[], float] = time.time,
        logger: Any = None,
        tables: TableFeed | None = None,
    ) -> None:
        self._store = store
        self._tables = tables  # this agent's copy of the tables (WatchTable)
        self._cluster = cluster
        self._controller = controller
        self._log_source = log_source
        self._members = members
        self._clock = clock
        self._log = logger or structlog.get_logger("shoal.api")

    # -- apply ----------------------------------------------------------------------

    @_edge
    @_on_leader
    async def Apply(self, request: control_pb2.ApplyRequest, context: grpc.aio.ServicerContext) -> control_pb2.ApplyResponse:
        if request.dry_run:
            results, _ = self._prepare(request, self._store.state)
            return control_pb2.ApplyResponse(objects=results)
        results = []

        def build(state: ClusterState) -> Txn:
            found, txn = self._prepare(request, state)
            results[:] = found
            return txn

        revision = await self._store.update(build)
        self._log.info("api.applied", objects=[f"{r.kind}/{r.name}:{r.action}" for r in results], revision=revision)
        return control_pb2.ApplyResponse(objects=results)

    @_edge
    async def Plan(self, request: control_pb2.ApplyRequest, context: grpc.aio.ServicerContext) -> control_pb2.PlanResponse:
        """What applying these manifests would place where, and what would not fit and
        why, computed by the controller on a copy of the state; nothing is written."""
        if self._cluster is not None:
            await self._cluster.read_barrier()
        results, txn = self._prepare(request, self._store.state)
        state = ClusterState.from_snapshot(self._store.state.to_snapshot())
        if txn:
            state.apply(txn)
        # A controller of its own: planning must not consume the real one's random
        # choices or cache, or the real placement would differ from what a plan shows.
        planner = Controller(Scheduler(self._controller.scheduler_config, random.Random(0)), random.Random(0))
        plan = planner.reconcile(state, self._clock())
        wanted = {r.name for r in results if r.kind == "Deployment"}
        resp = control_pb2.PlanResponse(objects=results)
        for op in plan.ops:
            if not isinstance(op, Put):
                continue
            if op.kind == "replicas":
                rec = ReplicaRecord.from_dict(op.value)
                if rec.deployment in wanted and rec.node:
                    resp.placements.append(control_pb2.Placement(
                        deployment=rec.deployment, replica=rec.id, node=rec.node, host_port=rec.host_port))
            elif op.kind == "deployments" and op.name in wanted:
                dep = DeploymentRecord.from_dict(op.value)
                if dep.unschedulable:
                    placed = sum(1 for p in resp.placements if p.deployment == dep.name)
                    resp.unplaced.append(control_pb2.Unplaced(deployment=dep.name, reason=dep.unschedulable,
                                                              placed=placed))
        return resp

    def _prepare(self, request: control_pb2.ApplyRequest, state: ClusterState) -> tuple[list[control_pb2.AppliedObject], Txn]:
        """Validate the request's manifests whole and turn them into one transaction."""
        docs: list[Document] = []
        problems: list[ManifestProblem] = []
        if not request.documents:
            raise _InvalidRequest("apply needs at least one document")
        for d in request.documents:
            source = d.source or "<request>"
            if len(d.content.encode()) > MAX_DOCUMENT_BYTES:
                problems.append(ManifestProblem(source=source, line=None, path="",
                                                message=f"larger than {MAX_DOCUMENT_BYTES} bytes; refused"))
                continue
            try:
                docs.extend(parse_text(d.content, source))
            except ManifestError as exc:
                problems.extend(exc.problems)
        seen: dict[tuple[str, str], Document] = {}
        for doc in docs:
            key = (doc.kind, doc.name)
            if key in seen:
                first = seen[key]
                problems.append(ManifestProblem(source=doc.source, line=doc.line, path="metadata.name",
                                                message=f'{doc.kind} "{doc.name}" is also defined at {first.source}:{first.line}'))
            seen[key] = doc
        if problems:
            raise ManifestError(problems)

        now = self._clock()
        ops: list[Put | Delete] = []
        events: list[NewEvent] = []
        results = []
        for doc in docs:
            if doc.kind == "Deployment":
                action, op = self._apply_deployment(doc, now, state)
            else:
                action, op = self._apply_service(doc, now, state)
            if op is not None:
                ops.append(op)
                events.append(NewEvent(time=now, type="Normal", reason=action.capitalize(),
                                       object=f"{doc.kind.lower()}/{doc.name}", message=f"{doc.kind.lower()} {action} from {doc.source}"))
            results.append(control_pb2.AppliedObject(kind=doc.kind, name=doc.name, action=action))
        return results, Txn(ops=tuple(ops), events=tuple(events))

    def _apply_deployment(self, doc: Document, now: float, state: ClusterState) -> tuple[str, Put | None]:
        existing_raw = state.get("deployments", doc.name)
        if existing_raw is None:
            rec = DeploymentRecord(name=doc.name, manifest=doc.raw, created_at=now, updated_at=now)
            return "created", Put(kind="deployments", name=doc.name, value=rec.to_dict())
        old = DeploymentRecord.from_dict(existing_raw)
        if old.manifest == doc.raw:
            return "unchanged", None
        old_spec = self._controller.deployment_spec(old)
        assert isinstance(doc.spec, DeploymentSpec)
        template_generation = old.template_generation
        if old_spec is None or _template_key(old_spec) != _template_key(doc.spec):
            template_generation += 1
        rec = dataclasses.replace(old, manifest=doc.raw, generation=old.generation + 1,
                                  template_generation=template_generation, updated_at=now)
        return "configured", Put(kind="deployments", name=doc.name, value=rec.to_dict())

    def _apply_service(self, doc: Document, now: float, state: ClusterState) -> tuple[str, Put | None]:
        existing_raw = state.get("services", doc.name)
        if existing_raw is None:
            rec = ServiceRecord(name=doc.name, manifest=doc.raw, created_at=now)
            return "created", Put(kind="services", name=doc.name, value=rec.to_dict())
        old = ServiceRecord.from_dict(existing_raw)
        if old.manifest == doc.raw:
            return "unchanged", None
        rec = dataclasses.replace(old, manifest=doc.raw, generation=old.generation + 1)
        return "configured", Put(kind="services", name=doc.name, value=rec.to_dict())

    # -- reads ----------------------------------------------------------------------

    @_edge
    async def Get(self, request: control_pb2.GetRequest, context: grpc.aio.ServicerContext) -> control_pb2.GetResponse:
        kind = KIND_ALIASES.get(request.kind.lower())
        if kind is None:
            raise _InvalidRequest(f'unknown resource type "{request.kind}"; use one of deployments, services, pods, endpoints, nodes, events')
        if self._cluster is not None:
            # Linearizable: what any write acknowledged before this call wrote is visible,
            # on a follower too; a deposed leader cannot pass this point.
            await self._cluster.read_barrier()
        state = self._store.state
        resp = control_pb2.GetResponse()
        replicas = [ReplicaRecord.from_dict(r) for r in state.list("replicas")]
        nodes = {n["name"]: NodeRecord.from_dict(n) for n in state.list("nodes")}

        def pick(items: list[Any], key: Callable[[Any], str], what: str) -> list[Any]:
            if not request.name:
                return items
            chosen = [i for i in items if key(i) == request.name]
            if not chosen:
                raise NotFound(what, request.name)
            return chosen

        if kind == "deployments":
            for rec in pick([DeploymentRecord.from_dict(d) for d in state.list("deployments")], lambda r: r.name, "deployment"):
                spec = self._controller.deployment_spec(rec)
                resp.deployments.append(convert.deployment_pb(rec, spec, [r for r in replicas if r.deployment == rec.name]))
        elif kind == "services":
            for srec in pick([ServiceRecord.from_dict(s) for s in state.list("services")], lambda r: r.name, "service"):
                t = state.get("tables", srec.name)
                resp.services.append(convert.service_pb(srec, self._controller.service_spec(srec), TableRecord.from_dict(t) if t else None))
        elif kind == "pods":
            specs = self._specs()
            for r in pick(replicas, lambda r: r.id, "pod"):
                resp.pods.append(convert.pod_pb(r, nodes.get(r.node), specs.get(r.deployment)))
        elif kind == "endpoints":
            tables = [TableRecord.from_dict(t) for t in state.list("tables")]
            for t in pick(tables, lambda t: t.service, "endpoints"):
                resp.endpoints.append(convert.table_pb(t))
        elif kind == "nodes":
            specs = self._specs()
            for n in pick(list(nodes.values()), lambda n: n.name, "node"):
                on = [r for r in replicas if r.node == n.name]
                cpu = sum((s.requests.cpu_millis or 0) for r in on if (s := specs.get(r.deployment)))
                mem = sum((s.requests.memory_bytes or 0) for r in on if (s := specs.get(r.deployment)))
                resp.nodes.append(convert.node_pb(n, cpu, mem, len(on)))
        else:
            for e in state.events_since(0):
                resp.events.append(convert.event_pb(e))
        return resp

    def _specs(self) -> dict[str, DeploymentSpec]:
        out: dict[str, DeploymentSpec] = {}
        for d in self._store.state.list("deployments"):
            spec = self._controller.deployment_spec(DeploymentRecord.from_dict(d))
            if spec is not None:
                out[d["name"]] = spec
        return out

    # -- writes ---------------------------------------------------------------------

    @_edge
    @_on_leader
    async def Delete(self, request: control_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> control_pb2.DeleteResponse:
        kind = KIND_ALIASES.get(request.kind.lower())
        if kind not in ("deployments", "services"):
            raise _InvalidRequest(f'cannot delete "{request.kind}": only deployments and services are deleted directly')
        now = self._clock()

        def build(state: ClusterState) -> Txn:
            if state.get(kind, request.name) is None:
                raise NotFound(kind.rstrip("s"), request.name)
            ops: list[Put | Delete] = [Delete(kind=kind, name=request.name)]
            if kind == "deployments":
                ops += [Delete(kind="replicas", name=r["id"]) for r in state.list("replicas")
                        if r["deployment"] == request.name]
            else:
                ops.append(Delete(kind="tables", name=request.name))
            return Txn(ops=tuple(ops), events=(NewEvent(
                time=now, type="Normal", reason="Deleted", object=f"{kind.rstrip('s')}/{request.name}", message="deleted"),))

        await self._store.update(build)
        return control_pb2.DeleteResponse(kind=kind, name=request.name)

    @_edge
    @_on_leader
    async def Scale(self, request: control_pb2.ScaleRequest, context: grpc.aio.ServicerContext) -> control_pb2.ScaleResponse:
        if request.replicas < 0:
            raise _InvalidRequest(f"replicas must be 0 or more, got {request.replicas}")
        now = self._clock()

        def build(state: ClusterState) -> Txn:
            raw = state.get("deployments", request.deployment)
            if raw is None:
                raise NotFound("deployment", request.deployment)
            rec = DeploymentRecord.from_dict(raw)
            manifest = dict(rec.manifest)
            manifest["spec"] = dict(manifest.get("spec", {}), replicas=request.replicas)
            new = dataclasses.replace(rec, manifest=manifest, generation=rec.generation + 1, updated_at=now)
            return Txn(
                ops=(Put(kind="deployments", name=rec.name, value=new.to_dict()),),
                events=(NewEvent(time=now, type="Normal", reason="Scaled", object=f"deployment/{rec.name}",
                                 message=f"scaled to {request.replicas} replicas"),),
            )

        await self._store.update(build)
        return control_pb2.ScaleResponse(deployment=request.deployment, replicas=request.replicas)

    # -- streams --------------------------------------------------------------------

    async def WatchEvents(self, request: control_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[types_pb2.Event]:
        seq = request.since
        while True:
            revision = self._store.state.revision
            for e in self._store.state.events_since(seq):
                seq = e["seq"]
                if request.object and e["object"] != request.object:
                    continue
                yield convert.event_pb(e)
            if not request.follow:
                return
            await self._store.wait(revision, timeout=5.0)

    async def Logs(self, request: control_pb2.LogsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[control_pb2.LogChunk]:
        raw = self._store.state.get("replicas", request.pod)
        if raw is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'pod "{request.pod}" not found')
            return
        if self._log_source is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server cannot reach pod logs")
            return
        try:
            async for chunk in self._log_source(ReplicaRecord.from_dict(raw), request.follow, request.tail):
                yield control_pb2.LogChunk(data=chunk)
        except ShoalError as exc:
            await context.abort(status_for(exc), str(exc))

    async def Members(self, request: control_pb2.MembersRequest, context: grpc.aio.ServicerContext) -> control_pb2.MembersResponse:
        return control_pb2.MembersResponse(members=self._members() if self._members else [])

    async def WatchTable(self, request: control_pb2.WatchTableRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[types_pb2.Table]:
        async for table in watch_table(self._tables, request, context, holder="server"):
            yield table

    # -- nodes ------------------------------------------------------------------------

    @_edge
    @_on_leader
    async def Cordon(self, request: control_pb2.CordonRequest, context: grpc.aio.ServicerContext) -> control_pb2.CordonResponse:
        if request.drain and not request.cordon:
            raise _InvalidRequest("drain needs cordon: a node being drained takes no new replicas")
        now = self._clock()

        def build(state: ClusterState) -> Txn:
            raw = state.get("nodes", request.node)
            if raw is None:
                raise NotFound("node", request.node)
            rec = NodeRecord.from_dict(raw)
            new = dataclasses.replace(rec, cordoned=request.cordon, draining=request.cordon and request.drain)
            if new == rec:
                return Txn()
            what = "drained" if new.draining else "cordoned" if new.cordoned else "uncordoned"
            return Txn(ops=(Put(kind="nodes", name=rec.name, value=new.to_dict()),), events=(
                NewEvent(time=now, type="Normal", reason=what.capitalize(), object=f"node/{rec.name}",
                         message=f"node {rec.name} {what}"),))

        await self._store.update(build)
        left = sum(1 for r in self._store.state.list("replicas") if r.get("node") == request.node)
        return control_pb2.CordonResponse(node=request.node, replicas=left)

    # -- servers ----------------------------------------------------------------------

    def _require_cluster(self) -> ServerRole:
        if self._cluster is None:
            raise Unavailable("this server has no replicated store")
        return self._cluster

    @_edge
    async def Servers(self, request: control_pb2.ServersRequest, context: grpc.aio.ServicerContext) -> control_pb2.ServersResponse:
        cluster = self._require_cluster()
        if request.local:
            return control_pb2.ServersResponse(servers=[cluster.local_status(cluster.config.node_name)])
        return control_pb2.ServersResponse(servers=await cluster.servers())

    @_edge
    @_on_leader
    async def AddServer(self, request: control_pb2.AddServerRequest, context: grpc.aio.ServicerContext) -> control_pb2.AddServerResponse:
        return await self._require_cluster().add_server(request)

    @_edge
    @_on_leader
    async def RemoveServer(self, request: control_pb2.RemoveServerRequest, context: grpc.aio.ServicerContext) -> control_pb2.RemoveServerResponse:
        if not request.id and not request.name:
            raise _InvalidRequest("RemoveServer needs a server id or name")
        return control_pb2.RemoveServerResponse(id=await self._require_cluster().remove_server(request))
