"""A warm ClientApp launcher: the stack imported once, each task in a child forked from it.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (its SuperExec runs
the console script per task), so every round pays Python's start, the import of torch and of
the app, and Python's exit. With the SuperNode in ``--isolation process``, Flower expects
someone else to take the tasks from its Runtime API: ``serve`` does, in place of
``flower-superexec``. It imports the stack once, then for each ClientApp task it forks a
child that runs Flower's own ``flwr-clientapp`` entry point (``flwr.supernode.cli.flwr_clientapp``)
with the arguments Flower's SuperExec would give the console script. The child inherits the
imported modules, pulls its task, runs the ClientApp and pushes the reply exactly as a cold
process would, and ends without Python's teardown. A child that crashes (an exception,
a signal, a segfault) is reaped and logged; the launcher takes the next task.

The child loads the app the FAB names, as Flower does; when that module was preloaded
(``edgemri.clients.client_app`` by default) it is the one already imported. POSIX only (fork).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates

from edgemri.deploy.errors import DeployError

log = logging.getLogger("edgemri.launcher")

# What every ClientApp task imports: Flower's flwr-clientapp entry point, this project's ClientApp, and
# Opacus, which a client imports only when it trains with DP-SGD, as a phone does (half a second a task).
DEFAULT_PRELOAD = ("flwr.supernode.cli", "edgemri.clients.client_app", "opacus")
POLL_INTERVAL_S = 0.5  # Flower's SuperExec polls once a second; a loopback request is cheap
STOP_WAIT_S = 10.0  # on shutdown, how long running tasks get to push their final status


def clientapp_argv(spec: ExecutionSpec) -> list[str]:
    """The command line Flower's SuperExec gives ``flwr-clientapp`` for this task (``SubprocessExecutor``)."""
    argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def run_flwr_clientapp(argv: list[str]) -> None:
    """Flower's ``flwr-clientapp`` console script, in this process, with ``argv`` as its command line."""
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = list(argv)
    flwr_clientapp()


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


@dataclass
class Child:
    task_id: int
    started: float


@dataclass
class ForkExecutor:
    """Flower's SuperExec ``Executor`` protocol, launching each ClientApp task in a forked child.

    ``run_task(argv)`` is what the child runs (Flower's entry point by default). ``exits``
    records every reaped child as (task id, exit code, or minus the signal that ended it).
    """

    run_task: Callable[[list[str]], None] = run_flwr_clientapp
    children: dict[int, Child] = field(default_factory=dict)
    exits: list[tuple[int, int]] = field(default_factory=list)

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        """A SuperNode's tasks are ClientApps; no other task type is taken."""
        del insecure, root_certificates_path
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        """No capacity gate, as Flower's subprocess executor."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"the warm launcher runs ClientApp tasks only, not {spec.task_type}")
        argv = clientapp_argv(spec)
        try:
            pid = os.fork()
        except OSError as err:
            return LaunchResult.failed(f"fork failed: {err}")
        if pid == 0:
            self._child(argv)  # never returns
        self.children[pid] = Child(spec.task_id, time.monotonic())
        log.info("task %d: ClientApp in child %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def _child(self, argv: list[str]) -> None:
        """Run one task and leave with ``os._exit``: the launcher's exit handlers and Python's teardown are not
        the child's (and the teardown of a torch process costs about a second)."""
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)  # the launcher's handlers; Flower installs the task's own
            self.run_task(argv)
            code = 0
        except SystemExit as done:  # Flower's flwr_exit ends every task with sys.exit
            code = _exit_code(done.code)
        except BaseException:  # noqa: BLE001 - whatever the task raised, the child reports it and exits
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to keep
                    stream.flush()
            os._exit(code)

    def reconcile(self) -> None:
        """Reap children that ended, logging how: a crashed task never stops the launcher."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            child = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            self.exits.append((child.task_id, code))
            seconds = time.monotonic() - child.started
            if code == 0:
                log.info("task %d: child %d finished in %.1f s", child.task_id, pid, seconds)
            else:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                log.warning("task %d: child %d %s after %.1f s; taking the next task", child.task_id, pid, how,
                            seconds)

    def close(self, wait_s: float = STOP_WAIT_S) -> None:
        """SIGTERM running tasks (Flower's handler pushes their status), SIGKILL what is left after ``wait_s``."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + wait_s
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.1)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.exits.append((self.children.pop(pid).task_id, -signal.SIGKILL))


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds a blocked poll too; serve's finally stops the tasks


def serve(runtime_api_address: str, *, insecure: bool, root_certificates: str | None = None,
          preload: Sequence[str] = DEFAULT_PRELOAD, poll_interval_s: float = POLL_INTERVAL_S) -> None:
    """Take ClientApp tasks from a SuperNode's Runtime API (``--isolation process``) until SIGTERM or SIGINT.

    ``preload`` is imported before the first task; every child inherits it. A SuperNode that is
    not up yet, or restarts, is waited for (Flower's retries); running tasks are stopped on exit.
    """
    if not 0.01 <= poll_interval_s <= 60:
        raise DeployError(f"poll interval {poll_interval_s} s is outside 0.01 to 60 s")
    if insecure and root_certificates:
        raise DeployError("give --insecure or --root-certificates, not both")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per poll, forever
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state schema, imported with its CLI
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; edgemri's handler would repeat them
    started = time.monotonic()
    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise DeployError(f"cannot preload module {module!r}: {err}") from None
    log.info("preloaded %s in %.1f s; taking ClientApp tasks from %s", ", ".join(preload) or "nothing",
             time.monotonic() - started, runtime_api_address)
    executor = ForkExecutor()
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    client = None
    try:
        client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=insecure,
            root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())  # a SuperNode that is down is waited for
        plugin = AutoExecPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                                root_certificates_path=root_certificates, runtime_dependency_install=False,
                                executor=executor)
        while True:
            executor.reconcile()
            task_types, fab_hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
            reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=sorted(task_types),
                                                          agentapp_fab_hashes=sorted(fab_hashes)))
            if reply.HasField("task") and reply.token:
                result = plugin.launch_task(token=reply.token, task=reply.task)
                if result.message:
                    log.warning("task %d: %s (%s)", reply.task.task_id, result.status, result.message)
            time.sleep(poll_interval_s)
    finally:
        executor.close()
        if client is not None:
            client.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
