"""A warm ClientApp launcher: the stack imported once, each ClientApp task in a child forked from it.

Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process: its SuperExec starts the
command by name from ``PATH`` for each task, so each round pays Python's start, the import of
torch, Flower and the app, and Python's exit. The launcher keeps to that public contract and
changes only who answers the command:

- ``serve`` imports the modules a task needs (``DEFAULT_PRELOAD``) and Flower's ``flwr-clientapp``
  command itself, found by its console-script name, then listens on a Unix socket.
- ``write_shim`` puts a small ``flwr-clientapp`` (``deploy/warm_shim.py``, stdlib only) into a folder
  that goes first on the SuperNode's ``PATH``. The SuperExec starts it as it would the real command;
  it hands its arguments, working folder, environment and standard streams (file descriptors) to the
  launcher and exits with the task's exit code. When no launcher answers, it runs the real command.
- For each task the launcher forks a child that runs Flower's ``flwr-clientapp`` with exactly those
  arguments, environment and streams: the child pulls its task, runs the ClientApp and pushes the
  reply as a cold process would, then ends without Python's teardown.

A child that crashes (an exception, a signal, a segfault) ends only itself: its exit status goes
back to the SuperExec through the shim, and the launcher takes the next task. A shim that is
killed takes its child with it (SIGTERM, so Flower's own exit handler pushes the task's status).
Only processes of the launcher's own user may connect (the socket's folder is 0700 and the peer's
uid is checked). Callers are served concurrently by one thread (a forked child copies only the thread
that forks): a selector reads each connection as its bytes come, each request has REQUEST_TIMEOUT_S to
arrive, at most MAX_CONNECTIONS are open at once and one more is refused at once (its shim runs the
task cold). Whatever one request does wrong ends only its connection, in one log line. POSIX only
(fork, descriptor passing).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.resources
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemri.core.io import private_folder, write_bytes, write_json
from edgemri.core.untrusted import Check, check_record, list_of, mapping_of, parse_json
from edgemri.deploy.errors import DeployError
from edgemri.deploy.warm_shim import COMMAND, HEADER, MAGIC, REQUEST_TIMEOUT_S, SETTINGS_SUFFIX

log = logging.getLogger("edgemri.launcher")

# What a ClientApp task imports: this project's ClientApp (torch with it) and Opacus, which a client imports
# only when it trains with DP-SGD, as a phone does. Flower's command is always loaded.
DEFAULT_PRELOAD = ("edgemri.clients.client_app", "opacus")
MAX_REQUEST_BYTES = 1 << 20
MAX_ARGS, MAX_ARG_CHARS, MAX_ENV_ENTRIES = 64, 4096, 4096
# Requests being read plus tasks running: a SuperNode runs one or two tasks at a time. One connection more is
# refused at once (its shim runs the task cold), so idle or stuck callers can neither queue tasks nor exhaust memory.
MAX_CONNECTIONS = 16
STOP_WAIT_S = 10.0  # on shutdown, how long running tasks get to push their final status
MAX_SOCKET_PATH_BYTES = 100  # AF_UNIX paths are limited to ~107 bytes
# Read once, when the launcher imported its stack: a task whose environment sets them otherwise runs cold
# (Flower's telemetry switch and log level, the thread pools' sizes, the module search path).
IMPORT_TIME_ENV = ("FLWR_TELEMETRY_ENABLED", "FLWR_LOG_LEVEL", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                   "OPENBLAS_NUM_THREADS", "PYTHONPATH")


def flwr_clientapp_command() -> Callable[[], object]:
    """Flower's ``flwr-clientapp`` command as a function: the console script its package registers."""
    found = importlib.metadata.entry_points(group="console_scripts", name=COMMAND)
    if not found:
        raise DeployError(f"no {COMMAND!r} console script is installed; install flwr 1.42 in this environment")
    return next(iter(found)).load()


def real_command(bin_dir: Path) -> Path:
    """The real ``flwr-clientapp`` executable: beside this interpreter, else on PATH outside ``bin_dir``."""
    beside = Path(sys.executable).parent / COMMAND
    if beside.is_file():
        return beside
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != bin_dir.resolve())
    found = shutil.which(COMMAND, path=path)
    if found is None:
        raise DeployError(f"no {COMMAND} executable beside {sys.executable} or on PATH; install flwr 1.42")
    return Path(found)


def write_shim(bin_dir: Path, socket_path: Path) -> Path:
    """Install ``bin_dir/flwr-clientapp`` (deploy/warm_shim.py, run by this interpreter) and its settings beside
    it: it hands each task to the launcher at ``socket_path``, or runs the real command when none answers.
    ``bin_dir`` goes first on the SuperNode's PATH, so it is made private (0700) whatever the umask."""
    private_folder(bin_dir, DeployError)
    shim = bin_dir / COMMAND
    write_json(Path(f"{shim}{SETTINGS_SUFFIX}"), {"socket": str(socket_path), "real": str(real_command(bin_dir))})
    source = importlib.resources.files(__package__).joinpath("warm_shim.py").read_bytes()
    return write_bytes(shim, f"#!{sys.executable} -IS\n".encode() + source, mode=0o755)


@dataclass(frozen=True)
class TaskRequest:
    """What the shim hands over: the command line, working folder and environment of one task."""

    argv: list[str]
    cwd: str
    env: dict[str, str]


def _string(limit: int) -> Check:
    """Any string a shell could pass (not only printable text), without NUL bytes, at most ``limit`` characters."""
    return Check(lambda v: isinstance(v, str) and "\0" not in v and len(v) <= limit,
                 f"a string without NUL bytes, at most {limit:,} characters")


_ARGUMENT = _string(MAX_ARG_CHARS)
_REQUEST = {  # what a shim sends: its command line, working folder and environment
    "argv": Check(lambda v: list_of(_ARGUMENT, 1, MAX_ARGS)(v) and v[0] == COMMAND,
                  f"a list of 1 to {MAX_ARGS} strings starting with {COMMAND!r}, each {_ARGUMENT.allowed}"),
    "cwd": Check(lambda v: _ARGUMENT(v) and Path(v).is_absolute(), "an absolute path"),
    "env": mapping_of(_string(256), _string(65_536), MAX_ENV_ENTRIES),
}


def parse_request(body: bytes) -> TaskRequest:
    """Validate a shim's request: JSON with exactly argv (``flwr-clientapp`` first), cwd and env."""
    request = check_record(parse_json(body, "the request", DeployError), _REQUEST, "the request", DeployError)
    return TaskRequest(list(request["argv"]), request["cwd"], dict(request["env"]))


def _exit_code(code: object) -> int:
    """What Python does with ``sys.exit(code)``: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def check_import_time_env(env: dict[str, str]) -> None:
    """Refuse a task whose environment differs from the launcher's where the stack read it at import."""
    differ = [name for name in IMPORT_TIME_ENV if env.get(name) != os.environ.get(name)]
    if differ:
        raise DeployError(f"the task's {', '.join(differ)} differ from the launcher's, which its imports already "
                          "read; start the launcher with the SuperNode's environment")


def run_task(command: Callable[[], object], request: TaskRequest, streams: Sequence[int]) -> int:
    """In the forked child: become the task's process (streams, folder, environment), run the command."""
    try:
        for target, fd in zip((0, 1, 2), streams, strict=True):
            os.dup2(fd, target)
            if fd != target:
                os.close(fd)
        for handler in logging.root.handlers[:]:  # the launcher's logging is not the task's: Flower sets its own
            logging.root.removeHandler(handler)
        os.chdir(request.cwd)
        os.environ.clear()
        os.environ.update(request.env)
        sys.argv = list(request.argv)
        command()
        return 0
    except SystemExit as done:
        return _exit_code(done.code)
    except BaseException:  # noqa: BLE001 - the child reports any failure as its exit code, like a cold process
        traceback.print_exc()
        return 1


class _Request:
    """One connection whose request is still arriving, read as its bytes come (the socket is non-blocking).

    The whole request has REQUEST_TIMEOUT_S from the connection on: a caller cannot hold its place by trickling it.
    """

    def __init__(self, number: int, conn: socket.socket) -> None:
        self.number, self.conn = number, conn
        self.deadline = time.monotonic() + REQUEST_TIMEOUT_S
        self.fds: list[int] = []  # the caller's three streams, once its header came
        self.size: int | None = None  # the body's length, from the header
        self.body = bytearray()

    def read(self) -> TaskRequest | None:
        """Take what has arrived: the validated request once it is whole, else None; DeployError when it is bad."""
        try:
            if self.size is None:
                self._read_header()
            else:
                chunk = self.conn.recv(min(65536, self.size - len(self.body)))
                if not chunk:
                    raise DeployError(f"the request ended after {len(self.body)} of {self.size} bytes")
                self.body += chunk
        except BlockingIOError:  # woken with nothing to read yet
            return None
        return parse_request(bytes(self.body)) if len(self.body) == self.size else None

    def _read_header(self) -> None:
        head, self.fds, _, _ = socket.recv_fds(self.conn, len(MAGIC) + HEADER.size, 3)
        if not head:
            raise DeployError("the caller hung up before sending its request")
        if len(self.fds) != 3 or not head.startswith(MAGIC) or len(head) != len(MAGIC) + HEADER.size:
            raise DeployError("the request must start with the launcher's header and three stream descriptors")
        (self.size,) = HEADER.unpack(head[len(MAGIC):])
        if self.size > MAX_REQUEST_BYTES:
            raise DeployError(f"the request is {self.size} bytes; allowed: at most {MAX_REQUEST_BYTES}")

    def close(self) -> None:
        _close_all(self.fds)
        self.conn.close()


def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def listen(socket_path: Path) -> socket.socket:
    """A Unix socket at ``socket_path`` in a private folder; a stale socket file from a dead launcher is replaced."""
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise DeployError(f"the launcher's socket {socket_path} is longer than {MAX_SOCKET_PATH_BYTES} bytes (a Unix "
                          "socket path limit); choose a shorter --dir")
    # Refused rather than tightened when open to others: they may have planted commands in bin/, first on PATH.
    private_folder(socket_path.parent, DeployError, tighten=False)
    if socket_path.is_symlink() or (socket_path.exists() and not socket_path.is_socket()):
        raise DeployError(f"{socket_path} exists and is not a socket; remove it or choose another --dir")
    with contextlib.suppress(FileNotFoundError):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(socket_path))
            raise DeployError(f"a launcher already listens on {socket_path}")
        except ConnectionRefusedError:
            socket_path.unlink()
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(64)
    return listener


@dataclass
class _Task:
    number: int
    conn: socket.socket
    started: float
    stopped: float | None = None  # when it was sent SIGTERM because its caller went away


class Launcher:
    """The serving loop: one thread (a forked child copies only the thread that forks), a selector that reads every
    connection as its bytes come, children forked from it, each child's exit sent back to its shim."""

    def __init__(self, listener: socket.socket, command: Callable[[], object]) -> None:
        self.listener, self.command = listener, command
        self.socket_path = listener.getsockname()
        self.selector = selectors.DefaultSelector()
        self.requests: dict[int, _Request] = {}  # task number -> its connection, while its request arrives
        self.tasks: dict[int, _Task] = {}  # child pid -> its task
        self.count = 0
        self.stopping = False
        self.wake_read, self.wake_write = socket.socketpair()
        for end in (self.wake_read, self.wake_write):
            end.setblocking(False)

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_write.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd sees it
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        log.info("warm launcher ready on %s (pid %d)", self.socket_path, os.getpid())
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=self._select_timeout()):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self.wake_read.recv(4096)
                    elif isinstance(key.data, _Request):
                        self._read(key.data)
                    else:
                        self._shim_gone(key.data)
                self._drop_late()
                self._reap()
                self._kill_overdue()
        finally:
            self._shutdown()

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _select_timeout(self) -> float:
        """Until the next request's deadline, at most 1 s (a signal wakes the loop at once anyway)."""
        now = time.monotonic()
        return max(0.0, min([1.0, *(request.deadline - now for request in self.requests.values())]))

    def _accept(self) -> None:
        """Take a connection, or refuse it at once when MAX_CONNECTIONS are open: nothing waits in a queue."""
        try:
            conn, _ = self.listener.accept()
        except OSError as err:  # out of file descriptors, say: the shim falls back to the real command
            log.warning("could not accept a task: %s", err)
            return
        self.count += 1
        request = _Request(self.count, conn)
        try:
            if len(self.requests) + len(self.tasks) >= MAX_CONNECTIONS:
                raise DeployError(f"busy: {MAX_CONNECTIONS} connections are open, the most it takes at once")
            uid = _peer_uid(conn)
            if uid is not None and uid != os.getuid():
                raise DeployError(f"a process of uid {uid} connected; only uid {os.getuid()} may start tasks")
            conn.setblocking(False)
            self.selector.register(conn, selectors.EVENT_READ, request)
        except (DeployError, OSError) as err:
            self._refuse(request, err)
            return
        self.requests[request.number] = request

    def _read(self, request: _Request) -> None:
        """Take what a caller sent; fork its task once the request is whole and valid."""
        try:
            task = request.read()
            if task is None:
                return
            check_import_time_env(task.env)
            pid = self._fork(request, task)
        except Exception as err:  # noqa: BLE001 - whatever one request does wrong ends its connection, not the launcher
            self._refuse(request, err)
            return
        _close_all(request.fds)  # the child has them
        del self.requests[request.number]
        self.tasks[pid] = _Task(request.number, request.conn, time.monotonic())
        with contextlib.suppress(OSError):  # a shim already gone is seen as such below
            request.conn.sendall(f"started {pid}\n".encode())
        self.selector.modify(request.conn, selectors.EVENT_READ, pid)
        log.info("task %d: ClientApp in child %d", request.number, pid)

    def _refuse(self, request: _Request, err: Exception) -> None:
        """End a connection whose task does not start, in one log line and one reply line (its shim runs it cold)."""
        reason = str(err) if isinstance(err, DeployError) else f"{type(err).__name__}: {err}"
        reason = " ".join(reason.split())[:300]
        log.warning("task %d refused: %s", request.number, reason)
        self.requests.pop(request.number, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(request.conn)
        with contextlib.suppress(OSError):
            request.conn.sendall(f"error {reason}\n".encode())
        request.close()

    def _drop_late(self) -> None:
        now = time.monotonic()
        for request in [r for r in self.requests.values() if r.deadline <= now]:
            self._refuse(request, DeployError(f"the request took more than {REQUEST_TIMEOUT_S:.0f} s to arrive"))

    def _fork(self, request: _Request, task: TaskRequest) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1  # the child: nothing of the launcher's loop may run here, and it holds no other caller's streams
        try:
            signal.set_wakeup_fd(-1)
            for signum, handler in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGCHLD, signal.SIG_DFL),
                                    (signal.SIGINT, signal.default_int_handler)):
                signal.signal(signum, handler)
            self.selector.close()
            for own in (self.listener, self.wake_read, self.wake_write, request.conn,
                        *(t.conn for t in self.tasks.values())):
                own.close()
            for other in self.requests.values():
                if other is not request:
                    other.close()
            code = run_task(self.command, task, request.fds)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _shim_gone(self, pid: int) -> None:
        """The shim's end readable: at EOF it has exited or been killed, and its child goes with it."""
        task = self.tasks.get(pid)
        if task is None:
            return
        try:
            if task.conn.recv(1):
                return  # the shim sends nothing after its request; ignore it
        except BlockingIOError:
            return
        except OSError:
            pass  # reset: gone as well
        self.selector.unregister(task.conn)
        log.warning("task %d: its flwr-clientapp caller is gone; stopping child %d", task.number, pid)
        task.stopped = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _kill_overdue(self) -> None:
        """A child stopped for its gone caller that is still pushing its status after STOP_WAIT_S is killed."""
        for pid, task in self.tasks.items():
            if task.stopped is not None and time.monotonic() - task.stopped > STOP_WAIT_S:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.tasks:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no children left: tasks still listed were reaped elsewhere
                for pid in list(self.tasks):
                    self._finish(pid, 1)
                return
            if pid == 0:
                return
            if pid in self.tasks:
                self._finish(pid, os.waitstatus_to_exitcode(status))

    def _finish(self, pid: int, code: int) -> None:
        task = self.tasks.pop(pid)
        level = logging.INFO if code == 0 else logging.WARNING
        log.log(level, "task %d: child %d exited %s after %.2f s", task.number, pid,
                code if code >= 0 else f"on signal {-code}", time.monotonic() - task.started)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(task.conn)
        with contextlib.suppress(OSError):
            task.conn.setblocking(True)
            task.conn.sendall(f"exit {code}\n".encode())
        task.conn.close()

    def _shutdown(self) -> None:
        """Stop taking tasks (new shims run cold), then give running ones STOP_WAIT_S to push their status."""
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        for request in list(self.requests.values()):
            self._refuse(request, DeployError("the launcher is stopping"))
        log.info("stopping: %d running task(s) get %.0f s to finish", len(self.tasks), STOP_WAIT_S)
        for signum in (signal.SIGTERM, signal.SIGKILL):  # what is still running after the wait is killed
            for pid in list(self.tasks):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + STOP_WAIT_S
            while self.tasks and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.05)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _standard_streams_open() -> None:
    """Make sure descriptors 0-2 exist, so that a received stream can never land on one of them."""
    while True:
        fd = os.open(os.devnull, os.O_RDWR)
        if fd > 2:
            os.close(fd)
            return


def _check_fork_safe() -> None:
    """Fork copies one thread: nothing the preloaded stack started may be running or initialized."""
    if threading.active_count() > 1:
        raise DeployError(f"the preloaded modules started {threading.active_count() - 1} thread(s); a forked task "
                          "would inherit their locks; leave such modules out of --preload")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise DeployError("the preloaded modules initialized CUDA, which a forked task cannot use")


def serve(socket_path: Path, bin_dir: Path, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
    """Import the stack, write the shim, and serve ClientApp tasks until SIGTERM or SIGINT."""
    if not hasattr(socket, "send_fds") or not hasattr(os, "fork"):
        raise DeployError("the warm launcher needs a POSIX system (fork and Unix-socket descriptor passing)")
    socket_path, bin_dir = Path(socket_path).absolute(), Path(bin_dir).absolute()
    started = time.perf_counter()
    command = flwr_clientapp_command()
    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise DeployError(f"--preload {module}: cannot import it ({err})") from err
    _check_fork_safe()
    _standard_streams_open()
    listener = listen(socket_path)
    shim = write_shim(bin_dir, socket_path)
    log.info("imported %s in %.1f s; put %s first on the SuperNode's PATH", ", ".join(preload) or "Flower only",
             time.perf_counter() - started, shim.parent)
    Launcher(listener, command).run()


def warm_paths(folder: Path | None = None) -> tuple[Path, Path]:
    """The launcher's socket and shim folder inside ``folder`` (default: FLWR_HOME's ``edgemri-warm``)."""
    if folder is None:
        folder = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "edgemri-warm"
    return folder / "launcher.sock", folder / "bin"


def shim_path_env(bin_dir: Path, env: dict[str, Any]) -> dict[str, str]:
    """``env`` with ``bin_dir`` first on PATH: what a SuperNode needs to reach the launcher."""
    return {**env, "PATH": os.pathsep.join([str(Path(bin_dir).absolute()), env.get("PATH", os.defpath)])}
