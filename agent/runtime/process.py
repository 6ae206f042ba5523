"""The process driver: replicas as plain host processes, one process group each.

Rules:
- A replica runs `command + args` (the image is ignored; with no command, `args` alone)
  with the agent's environment, the spec's `env`, then `PORT=<host_port>` and
  `SHOAL_REPLICA=<replica_id>`, which win. Resource limits are not enforced (yet).
- Each replica is its own session and process group (`start_new_session=True`), so it
  survives the agent dying, even by `kill -9`, and `stop()` reaches its children too.
- stdout and stderr go to `state_dir/<replica_id>.log`; the log outlives `stop()` and is
  replaced by the next `start()` of the same replica.
- `state_dir/<replica_id>.json` is the replica's label: replica, deployment, generation,
  node, host port, pid and the process's create time. It is written atomically (temporary
  file, fsync, rename, fsync of the directory), so a crash leaves the old file or the
  new one, never half of one. `list()` reads these files: that is how a restarted agent
  adopts what its predecessor started.
- A pid alone proves nothing (pids are reused): a replica runs only while its pid exists,
  is not a zombie, and has the recorded create time.
- Exit codes: known for children this object started (it keeps their `Popen` and reaps
  them), written into the state file when seen so a later agent knows them too; unknown
  (None) for an adopted process that exited unseen. Death by signal N reads as 128 + N,
  as in Docker.
- `exec()` (exec probes) runs a command on the host with the replica's live environment
  and working directory, in a session of its own that is killed when it overstays.
- `stop()` sends SIGTERM to the group, SIGKILL after `timeout`, and waits until no live
  member remains. A group is signalled only while its leader is ours or gone: the kernel
  does not reuse a pid that still names a process group, so a vanished leader's group
  id still means our group.

`usages()` (for /metrics) walks each replica's process tree with psutil: CPU is user +
system time of every live member plus the time of the children each has reaped (so a
finished worker still counts, once), held monotonic per incarnation; memory is the sum
of their resident sets (shared pages count once per process: an upper bound).

`changes()` is fed by one watcher task that polls every `poll_interval` seconds (reaping
children and checking adopted pids) and by `start()`/`stop()` themselves. With no
replica to watch it does not poll at all (an idle agent's CPU, T9): it sleeps until
`start()` or a `list()` that finds (adopts) one wakes it.

This machine's lesson: PID 1 in a container may not reap orphans, so an adopted replica
that exits can stay a zombie forever; zombies therefore count as dead everywhere here.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import shutil
import socket
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import psutil
import structlog

from shoal.agent.runtime.base import Observed, Usage
from shoal.errors import HostPortInUse, NotFound, RuntimeDriverError
from shoal.model import Driver, RunSpec

__all__ = ["ProcessRuntime", "exit_code_from_returncode"]

# How close two create times must be to name the same process. psutil derives them from
# clock ticks since boot (10 ms), so a different process with a reused pid cannot match.
_CREATE_TIME_TOLERANCE = 0.05

# After SIGKILL a group normally vanishes at once; this only bounds a stuck (D-state) one.
_KILL_GRACE = 5.0

_LOG_CHUNK = 64 * 1024


def _port_free(port: int) -> bool:
    """Whether a TCP listener could bind `port` on every address right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def exit_code_from_returncode(returncode: int) -> int:
    """Docker's convention: death by signal N reads as exit code 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(slots=True)
class _Tracked:
    """A replica process this object watches for exits."""

    pid: int
    create_time: float
    popen: subprocess.Popen[bytes] | None
    exited: bool = False


def _process_matches(pid: int, create_time: float) -> psutil.Process | None:
    """The live (non-zombie) process `pid` if it is the one created at `create_time`."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > _CREATE_TIME_TOLERANCE:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _group_may_be_ours(pgid: int, create_time: float) -> bool:
    """Whether signalling process group `pgid` reaches only our replica's processes."""
    try:
        proc = psutil.Process(pgid)
    except psutil.NoSuchProcess:
        return True  # leader gone: any group still named pgid is the one it led
    try:
        return bool(abs(proc.create_time() - create_time) <= _CREATE_TIME_TOLERANCE)
    except psutil.NoSuchProcess:
        return True


def _live_group_members(pgid: int) -> list[int]:
    """Pids of the group's members that are not zombies."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # someone's processes are there; look closer
    members: list[int] = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise RuntimeDriverError(
            f"not allowed to signal process group {pgid} ({sig.name}): {exc}"
        ) from exc


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _tail_offset(f: BinaryIO, lines: int) -> int:
    """Byte offset where the last `lines` lines of the open binary file `f` begin."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    pos = end
    newlines = 0
    block = 8192
    # A final newline ends the last line rather than starting an empty one.
    if end > 0:
        f.seek(end - 1)
        if f.read(1) == b"\n":
            pos = end - 1
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step)
        idx = len(chunk)
        while True:
            idx = chunk.rfind(b"\n", 0, idx)
            if idx < 0:
                break
            newlines += 1
            if newlines == lines:
                return pos + idx + 1
    return 0


class ProcessRuntime:
    """Runs replicas as host process groups; see the module docstring."""

    driver: Driver

    def __init__(
        self,
        node_name: str,
        state_dir: Path,
        logger: Any = None,
        *,
        poll_interval: float = 0.2,
    ) -> None:
        """`poll_interval`: seconds between exit checks for `changes()` and between
        reads of a followed log; 0.2 s keeps a crash noticed well inside one probe
        period at negligible cost."""
        self.driver = Driver.PROCESS
        self.node_name = node_name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = logger if logger is not None else structlog.get_logger()
        self._poll_interval = poll_interval
        self._lock = threading.Lock()  # guards _tracked; taken in worker threads
        self._tracked: dict[str, _Tracked] = {}
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._pending: dict[asyncio.Queue[str | None], set[str]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._watcher_wake = asyncio.Event()
        self._closed = False
        # replica id → (pid, the highest CPU seconds reported): a descendant that exits
        # unreaped by the tree takes its time with it, and a counter must not go back.
        self._cpu_floor: dict[str, tuple[int, float]] = {}

    # -- paths and state files

    def _state_path(self, replica_id: str) -> Path:
        return self.state_dir / f"{replica_id}.json"

    def _log_path(self, replica_id: str) -> Path:
        return self.state_dir / f"{replica_id}.log"

    def _read_state(self, path: Path) -> dict[str, Any] | None:
        try:
            state = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._log.warning("runtime.state_unreadable", path=str(path), error=str(exc))
            return None
        if not isinstance(state, dict) or not {"replica", "pid", "create_time"} <= state.keys():
            self._log.warning("runtime.state_unreadable", path=str(path), error="missing fields")
            return None
        return state

    # -- Runtime protocol

    async def list(self) -> list[Observed]:
        """Every replica with a state file of this node, running or not."""
        found = await asyncio.to_thread(self._list_sync)
        if found:
            self._watcher_wake.set()  # adopted ones, maybe: the watcher has work
        return found

    async def start(self, spec: RunSpec) -> Observed:
        """Start `command + args` in a new session; replaces a replica of the same id."""
        if spec.driver is not Driver.PROCESS:
            raise RuntimeDriverError(
                f"replica {spec.replica_id} asks for the {spec.driver.value} driver, not process"
            )
        argv = [*spec.command, *spec.args]
        if not argv:
            raise RuntimeDriverError(
                f"replica {spec.replica_id}: the process driver needs a command to run "
                f"(the image {spec.image!r} is ignored)"
            )
        env = self._environment(spec)
        executable = shutil.which(argv[0], path=env.get("PATH", os.defpath))
        if executable is None:
            raise RuntimeDriverError(
                f'replica {spec.replica_id}: command "{argv[0]}" is not found or not executable'
            )
        if spec.limits.cpu_millis is not None or spec.limits.memory_bytes is not None:
            self._log.info("runtime.limits_not_enforced", replica=spec.replica_id, driver="process")
        # Replacing: the old incarnation goes first, at once, as Docker's forced remove.
        await self._stop(spec.replica_id, timeout=0.0, announce=False)
        if spec.host_port is not None and not _port_free(spec.host_port):
            # The process would bind PORT and die with a message only it knows; finding
            # out here lets the leader give the replica another port.
            raise HostPortInUse(
                f"host port {spec.host_port} is already in use on this node, so replica "
                f"{spec.replica_id} cannot listen on it",
                port=spec.host_port,
            )
        observed = await asyncio.to_thread(self._spawn, spec, argv, executable, env)
        self._watcher_wake.set()
        self._announce(spec.replica_id)
        self._log.info(
            "runtime.process_started",
            replica=spec.replica_id,
            pid=int(observed.handle.removeprefix("pid:")),
            host_port=spec.host_port,
            node=self.node_name,
        )
        return observed

    async def stop(self, replica_id: str, *, timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL after `timeout`, remove the state file; keep the log."""
        await self._stop(replica_id, timeout=timeout, announce=True)

    async def exec(self, replica_id: str, command: Sequence[str], timeout: float) -> int:
        """Run `command` on the host as the replica runs: with its environment and working
        directory (read from its live process), in a session of its own, output discarded;
        the session is SIGKILLed after `timeout` seconds. Returns the exit status."""
        if not command:
            raise RuntimeDriverError(f"replica {replica_id}: an exec probe needs a command")
        env, cwd = await asyncio.to_thread(self._exec_context, replica_id)
        argv0 = command[0]
        executable: str | None
        if os.sep in argv0:
            executable = argv0 if os.path.isabs(argv0) else os.path.join(cwd, argv0)
            if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
                executable = None
        else:
            executable = shutil.which(argv0, path=env.get("PATH", os.defpath))
        if executable is None:
            raise RuntimeDriverError(f'replica {replica_id}: command "{argv0}" is not found or not executable')
        try:
            proc = await asyncio.create_subprocess_exec(
                executable, *command[1:], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeDriverError(f'replica {replica_id}: cannot run "{argv0}": {exc.strerror or exc}') from exc
        try:
            async with asyncio.timeout(timeout):
                returncode = await proc.wait()
        except TimeoutError:
            raise RuntimeDriverError(
                f'replica {replica_id}: "{argv0}" did not finish within {timeout:g} s'
            ) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: the whole session goes
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        return exit_code_from_returncode(returncode)

    def usages(self, replicas: Sequence[Observed]) -> dict[str, Usage]:
        """CPU time and resident memory of each running replica's process tree."""
        out: dict[str, Usage] = {}
        floors: dict[str, tuple[int, float]] = {}
        for o in replicas:
            if not o.running or o.started_at is None or not o.handle.startswith("pid:"):
                continue
            pid = int(o.handle.removeprefix("pid:"))
            leader = _process_matches(pid, o.started_at)
            if leader is None:
                continue
            try:
                members = [leader, *leader.children(recursive=True)]
            except psutil.Error:
                continue
            cpu, memory = 0.0, 0
            for proc in members:
                try:
                    with proc.oneshot():
                        t = proc.cpu_times()
                        rss = proc.memory_info().rss
                except psutil.Error:
                    continue  # exited meanwhile: its reaper has its time
                cpu += t.user + t.system + t.children_user + t.children_system
                memory += rss
            floor = self._cpu_floor.get(o.replica_id)
            if floor is not None and floor[0] == pid:
                cpu = max(cpu, floor[1])
            floors[o.replica_id] = (pid, cpu)
            out[o.replica_id] = Usage(cpu_seconds=cpu, memory_bytes=memory)
        # Only the replicas still running keep a floor: nothing outlives a replica.
        self._cpu_floor = floors
        return out

    async def address(self, replica_id: str, container_port: int) -> tuple[str, int]:
        """A process listens on the host itself: loopback, the port as written."""
        return ("127.0.0.1", container_port)

    async def logs(
        self, replica_id: str, *, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[bytes]:
        """The log file's content; with `follow`, new output as it comes, until cancelled.

        A `start()` of the same replica replaces the file with a new one; a follower
        notices and carries on from the new file's beginning.
        """
        path = self._log_path(replica_id)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise NotFound("replica", replica_id) from None
        try:
            if tail is not None:
                await asyncio.to_thread(lambda: f.seek(_tail_offset(f, tail)))
            while True:
                chunk = await asyncio.to_thread(f.read, _LOG_CHUNK)
                if chunk:
                    yield chunk
                    continue
                if not follow or self._closed:
                    return
                if await asyncio.to_thread(self._replaced, path, f):
                    f.close()
                    f = await asyncio.to_thread(open, path, "rb")
                    continue
                await asyncio.sleep(self._poll_interval)
        finally:
            f.close()

    async def changes(self) -> AsyncIterator[str]:
        """Replica ids that started, stopped or exited, until `close()`."""
        if self._closed:
            return
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._subscribers.add(queue)
        self._pending[queue] = set()
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="shoal-process-watcher")
        try:
            while True:
                replica_id = await queue.get()
                if replica_id is None:
                    return
                self._pending[queue].discard(replica_id)
                yield replica_id
        finally:
            self._subscribers.discard(queue)
            self._pending.pop(queue, None)
            if not self._subscribers and self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None

    async def close(self) -> None:
        """Stop the watcher, end every `changes()` and followed log; processes keep running.

        Exit codes of children that exit after this are no longer known (None).
        """
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        # Let go of the children: once no one holds its Popen, Python's subprocess
        # module reaps a child that exits later (no zombies), and would warn that it is
        # "still running" -- which is the point of a replica, so not a warning here.
        with self._lock:
            released = [t.popen for t in self._tracked.values() if t.popen is not None]
            for tracked in self._tracked.values():
                tracked.popen = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del released

    # -- helpers

    async def _stop(self, replica_id: str, *, timeout: float, announce: bool) -> None:
        path = self._state_path(replica_id)
        state = await asyncio.to_thread(self._read_state, path)
        with self._lock:
            tracked = self._tracked.pop(replica_id, None)
        if state is not None:
            pid, create_time = int(state["pid"]), float(state["create_time"])
        elif tracked is not None:
            pid, create_time = tracked.pid, tracked.create_time
        else:
            return  # nothing of it left: stopping is idempotent
        popen = tracked.popen if tracked is not None and tracked.pid == pid else None
        await asyncio.to_thread(self._terminate, replica_id, pid, create_time, popen, timeout)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        self._log.info("runtime.process_stopped", replica=replica_id, pid=pid, node=self.node_name)
        if announce:
            self._announce(replica_id)

    # -- worker-thread helpers

    def _exec_context(self, replica_id: str) -> tuple[dict[str, str], str]:
        """The environment and working directory of the replica's running process."""
        state = self._read_state(self._state_path(replica_id))
        if state is None or state.get("node") != self.node_name:
            raise NotFound("replica", replica_id)
        proc = _process_matches(int(state["pid"]), float(state["create_time"]))
        if proc is None:
            raise RuntimeDriverError(f"replica {replica_id} is not running")
        try:
            return dict(proc.environ()), str(proc.cwd())
        except psutil.NoSuchProcess:
            raise RuntimeDriverError(f"replica {replica_id} is not running") from None
        except psutil.AccessDenied as exc:
            raise RuntimeDriverError(
                f"replica {replica_id}: not allowed to read its environment for an exec probe ({exc})"
            ) from exc

    def _environment(self, spec: RunSpec) -> dict[str, str]:
        env = dict(os.environ)
        env.update(spec.env)
        if spec.host_port is not None:
            env["PORT"] = str(spec.host_port)
        env["SHOAL_REPLICA"] = spec.replica_id
        return env

    def _spawn(
        self, spec: RunSpec, argv: Sequence[str], executable: str, env: Mapping[str, str]
    ) -> Observed:
        log_path = self._log_path(spec.replica_id)
        # A new file (not the old one truncated), so a follower of the old one can tell.
        log_path.unlink(missing_ok=True)
        try:
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(
                    [executable, *argv[1:]],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise RuntimeDriverError(
                f'replica {spec.replica_id}: cannot run "{argv[0]}": {exc.strerror or exc}'
            ) from exc
        try:
            create_time = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:  # reaped already? only we reap, so this cannot be
            create_time = time.time()
        state = {
            "replica": spec.replica_id,
            "deployment": spec.deployment,
            "generation": spec.generation,
            "node": self.node_name,
            "host_port": spec.host_port,
            "pid": popen.pid,
            "create_time": create_time,
            "argv": argv,
            "exit_code": None,
        }
        _write_atomically(self._state_path(spec.replica_id), json.dumps(state, indent=1).encode())
        with self._lock:
            self._tracked[spec.replica_id] = _Tracked(pid=popen.pid, create_time=create_time, popen=popen)
        return Observed(
            replica_id=spec.replica_id,
            deployment=spec.deployment,
            generation=spec.generation,
            driver=Driver.PROCESS,
            handle=f"pid:{popen.pid}",
            running=True,
            started_at=create_time,
            host_port=spec.host_port,
        )

    def _list_sync(self) -> builtins.list[Observed]:
        found: builtins.list[Observed] = []
        for path in sorted(self.state_dir.glob("*.json")):
            state = self._read_state(path)
            if state is None or state.get("node") != self.node_name:
                continue
            found.append(self._observe(state, path))
        return found

    def _observe(self, state: dict[str, Any], path: Path) -> Observed:
        """What a state file's replica is doing now; records a newly seen exit code."""
        replica_id = str(state["replica"])
        pid = int(state["pid"])
        create_time = float(state["create_time"])
        with self._lock:
            tracked = self._tracked.get(replica_id)
            if tracked is None or tracked.pid != pid:
                # Adopted: started by an earlier agent (or another instance).
                tracked = _Tracked(pid=pid, create_time=create_time, popen=None)
                self._tracked[replica_id] = tracked
        exit_code = state.get("exit_code")
        running = False
        if tracked.popen is not None:
            returncode = tracked.popen.poll()
            if returncode is None:
                running = True
            else:
                exit_code = exit_code_from_returncode(returncode)
        else:
            running = _process_matches(pid, create_time) is not None
        if not running and exit_code is not None and state.get("exit_code") is None:
            state = {**state, "exit_code": exit_code}
            try:
                _write_atomically(path, json.dumps(state, indent=1).encode())
            except OSError as exc:
                self._log.warning("runtime.state_write_failed", replica=replica_id, error=str(exc))
        error = ""
        if not running:
            error = f"exited with code {exit_code}" if exit_code is not None else "process is gone"
        return Observed(
            replica_id=replica_id,
            deployment=str(state.get("deployment", "")),
            generation=int(state.get("generation", 0)),
            driver=Driver.PROCESS,
            handle=f"pid:{pid}",
            running=running,
            exit_code=None if running else exit_code,
            started_at=create_time,
            host_port=state.get("host_port"),
            error=error,
        )

    def _terminate(
        self,
        replica_id: str,
        pgid: int,
        create_time: float,
        popen: subprocess.Popen[bytes] | None,
        timeout: float,
    ) -> None:
        if popen is not None:
            popen.poll()  # reap a dead leader so it does not count as a member
        if not _group_may_be_ours(pgid, create_time):
            return  # the pid was reused: our group is long gone
        if not self._wait_group_gone(pgid, popen, 0.0):
            _signal_group(pgid, signal.SIGTERM)
            if self._wait_group_gone(pgid, popen, timeout):
                return
            self._log.info("runtime.process_kill", replica=replica_id, pid=pgid, after=timeout)
            _signal_group(pgid, signal.SIGKILL)
            if not self._wait_group_gone(pgid, popen, _KILL_GRACE):
                raise RuntimeDriverError(
                    f"replica {replica_id}: process group {pgid} survived SIGKILL for {_KILL_GRACE:g} s"
                )

    def _wait_group_gone(self, pgid: int, popen: subprocess.Popen[bytes] | None, timeout: float) -> bool:
        """Poll until the group has no live member; False if `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            if popen is not None:
                popen.poll()
            if not _live_group_members(pgid):
                if popen is not None:
                    popen.poll()  # the leader is at most a zombie now: reap it
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    @staticmethod
    def _replaced(path: Path, f: BinaryIO) -> bool:
        """Whether the log at `path` is no longer the open file `f` (a new start)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        cur = os.fstat(f.fileno())
        return (st.st_ino, st.st_dev) != (cur.st_ino, cur.st_dev) or st.st_size < f.tell()

    def _scan_exits(self) -> builtins.list[str]:
        """Replica ids whose process exited since the last scan (worker thread).

        Reading the state files each time also adopts replicas another agent started
        and forgets those whose file is gone.
        """
        observed = self._list_sync()
        exited: builtins.list[str] = []
        with self._lock:
            current = {o.replica_id for o in observed}
            for replica_id in [r for r in self._tracked if r not in current]:
                del self._tracked[replica_id]
            for o in observed:
                tracked = self._tracked.get(o.replica_id)
                if not o.running and tracked is not None and not tracked.exited:
                    tracked.exited = True
                    exited.append(o.replica_id)
        return exited

    # -- changes plumbing (event loop)

    async def _watch(self) -> None:
        while True:
            # Cleared before the scan: a start() after it sets the event again, so the
            # wait below cannot miss a replica the scan did not see yet.
            self._watcher_wake.clear()
            try:
                exited = await asyncio.to_thread(self._scan_exits)
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive a bad scan
                self._log.warning("runtime.process_watch_failed", error=str(exc))
                exited = []
            for replica_id in exited:
                self._log.info("runtime.process_exited", replica=replica_id, node=self.node_name)
                self._announce(replica_id)
            with self._lock:
                idle = not self._tracked
            if idle:
                await self._watcher_wake.wait()
            else:
                await asyncio.sleep(self._poll_interval)

    def _announce(self, replica_id: str) -> None:
        for queue in self._subscribers:
            pending = self._pending.setdefault(queue, set())
            if replica_id not in pending:
                pending.add(replica_id)
                queue.put_nowait(replica_id)
