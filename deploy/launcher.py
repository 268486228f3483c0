"""One machine, real processes: a TLS SuperLink with SuperNode authentication and real SuperNodes.

For tests, the benchmarks and the one-machine walkthrough in docs/DEPLOY.md: every process
listens on 127.0.0.1 on a free port, in its own FLWR_HOME, and is stopped on exit. A node
started ``warm`` has the warm ClientApp launcher (``edgemri client serve``, deploy/warm.py)
beside it, and its SuperNode finds the launcher's ``flwr-clientapp`` shim first on its PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from edgemri.deploy.certs import make_certs
from edgemri.deploy.errors import DeployError
from edgemri.deploy.nodes import make_node_keys, node_config_arg, node_key_paths, register_node
from edgemri.deploy.warm import shim_path_env, warm_paths
from edgemri.simulation.flower_run import (
    VENV_BIN,
    ManagedProcess,
    RunOutcome,
    flower_env,
    flwr_run,
    free_port,
    processes_under,
    start_process,
    stop_group,
    wait_healthy,
    write_connection,
)

REGISTERING_AT_ONCE = 4  # `flwr supernode register` processes side by side


def port_free(port: int) -> bool:
    """Nothing listens on the port (closed connections in TIME_WAIT do not count, as for any server)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _command(process: psutil.Process) -> str | None:
    """The process's command line, shortened; None when it has exited."""
    try:
        return " ".join(process.cmdline())[:150]
    except psutil.Error:
        return None


@dataclass
class _Launcher:
    """A warm launcher being started: its process, its socket and the folder of its ``flwr-clientapp`` shim."""

    process: ManagedProcess
    socket_path: Path
    bin_dir: Path

    def wait(self, name: str, timeout_s: float = 120.0) -> None:
        """Until the shim is written and the socket listens; else stop it and raise."""
        deadline = time.monotonic() + timeout_s
        while not ((self.bin_dir / "flwr-clientapp").is_file() and self.socket_path.is_socket()):
            if self.process.process.poll() is not None or time.monotonic() > deadline:
                self.process.stop()
                raise DeployError(f"the warm launcher of {name!r} did not start; see {self.process.log}")
            time.sleep(0.2)


@dataclass
class LocalNode:
    name: str
    node_id: int | None  # None: never registered
    port: int
    home: Path
    process: ManagedProcess
    launcher: ManagedProcess | None = None  # the warm ClientApp launcher; None: Flower's own flwr-clientapp

    @property
    def processes(self) -> list[ManagedProcess]:
        return [self.process] if self.launcher is None else [self.launcher, self.process]


class LocalDeployment:
    """A TLS SuperLink with SuperNode authentication and real SuperNodes, all on 127.0.0.1.

    ``with LocalDeployment(root) as d:`` makes certificates and a `flwr` connection,
    starts the SuperLink and waits until it answers; ``d.add_node(...)`` registers a key
    and starts a SuperNode in its own FLWR_HOME on its own port (``d.add_nodes``: many at
    once). ``d.stop_node(name, signal.SIGKILL)`` kills a device, ``d.start_node(...)``
    brings it back on the same key and state folder, ``d.restart_link()`` restarts the
    SuperLink on its database. Leaving the block stops every process it started (their
    ClientApp children included), also after a failure; ``d.leftovers()`` says what, if
    anything, still runs or listens.
    """

    connection = "edgemri-local"

    def __init__(self, root: Path, device_niceness: int = 0) -> None:
        self.root = Path(root).resolve()
        # Added to every SuperNode's and warm launcher's niceness (their ClientApps inherit it). Many devices on
        # one machine would otherwise starve the SuperLink, which a real deployment runs on a machine of its own.
        self.device_niceness = device_niceness
        self.home = self.root / "flwr-home"  # the `flwr` CLI's home: the connection lives here
        self.env = flower_env(self.home)
        self.port = 0
        self.certs: dict[str, Path] = {}
        self.link: ManagedProcess | None = None
        # The SuperExec that starts ServerApps, run beside the SuperLink (`--isolation process`) and restarted
        # whenever it exits: the one the SuperLink starts itself exits for good on one HTTP 500 (a locked
        # database under load), and no run starts after it (docs/DEPLOY.md, load test run 9).
        self.superexec: ManagedProcess | None = None
        self.superexec_restarts = 0
        self._stop_watching = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.nodes: dict[str, LocalNode] = {}
        self.node_ids: dict[str, int] = {}  # name -> id the SuperLink gave at registration
        self.node_ports: list[int] = []  # every SuperNode port used, restarted nodes' old ones too
        self.warm_dirs: list[Path] = []  # the warm launchers' socket folders

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.certs = make_certs(self.root / "certs", ["127.0.0.1"])
        self.port = free_port()
        write_connection(self.home, self.connection, self.address, root_certificates=self.certs["ca_cert"])
        self._start_link()

    def _start_link(self) -> None:
        self.link = start_process(
            [str(VENV_BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca_cert"]),
             "--ssl-certfile", str(self.certs["server_cert"]), "--ssl-keyfile", str(self.certs["server_key"]),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(self.port), "--database", str(self.root / "superlink.db"), "--isolation", "process"],
            self.env, self.root / "logs" / "superlink.log", cwd=self.root)
        wait_healthy(self.link, self.port, scheme="https")
        if self._watchdog is None:
            self._start_superexec()
            self._watchdog = threading.Thread(target=self._watch_superexec, name="superexec-watchdog", daemon=True)
            self._watchdog.start()

    def _start_superexec(self) -> None:
        # The command the SuperLink would run in its default (subprocess) isolation, on its TLS Runtime API.
        self.superexec = start_process(
            [str(VENV_BIN / "flower-superexec"), "--root-certificates", str(self.certs["ca_cert"]),
             "--runtime-api-address", self.address], self.env, self.root / "logs" / "superexec.log", cwd=self.root)

    def _watch_superexec(self) -> None:
        """Restart the SuperExec when it exits, as a service manager would (systemd's Restart=always). A SuperExec
        started here dies with this thread (``die_with_parent``), which lives until ``stop``."""
        while not self._stop_watching.wait(1.0):
            if self.superexec is not None and self.superexec.process.poll() is not None:
                self.superexec.stop()  # whatever it started and left
                self.superexec_restarts += 1
                self._start_superexec()

    def restart_link(self, stop_timeout_s: float = 90.0, grace_s: float = 30.0) -> list[str]:
        """Restart the SuperLink as an operator's restart does (SIGTERM, SIGKILL after ``stop_timeout_s`` as
        systemd's default, then start it again) on the same port, database and certificates. Returns the
        commands of the old SuperLink's processes still running ``grace_s`` after the new one is up (stopped
        then): none in Flower 1.42.

        Flower 1.42's SuperLink keeps registered nodes, their keys and ids in its ``--database`` (SQLite), so
        they stay valid, and running SuperNodes reconnect by themselves (their Fleet client retries without
        limit). On SIGTERM it stops listening at once but exits only when open connections close: a `flwr run
        --stream` of a running run holds one until the run is failed for want of the ServerApp's heartbeat
        (about a minute). The ServerApp of a running run does not survive: it exits when the restarted SuperLink
        refuses its task token (with Flower's default isolation, the SuperLink's own SuperExec and its ServerApp
        also stop as it exits; here the SuperExec is this deployment's and keeps running). A run is continued
        with a resumed `flwr run` (run config ``resume=true``).
        """
        old = self.link
        tree: list[psutil.Process] = []
        if old is not None:
            with contextlib.suppress(psutil.Error):
                tree = psutil.Process(old.process.pid).children(recursive=True)
            old.remember_children()
            old.process.send_signal(signal.SIGTERM)  # the SuperLink alone: what follows is Flower's doing
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.process.wait(timeout=stop_timeout_s)
            if old.process.poll() is None:
                old.stop(signal.SIGKILL)
        self._start_link()
        deadline = time.monotonic() + grace_s
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [c for p in tree if _alive(p) and (c := _command(p))]
        if old is not None:
            old.stop()  # whatever of its tree is left
        return survivors

    def make_key(self, name: str) -> tuple[Path, Path]:
        """The node's key pair in ``keys/`` (made once, kept for restarts)."""
        private, public = node_key_paths(self.keys_dir, name)
        if private.is_file():
            return private, public
        return make_node_keys(self.keys_dir, [name])[name]

    def register(self, name: str) -> int:
        self.node_ids[name] = register_node(self.make_key(name)[1], self.connection, self.env, name=name)
        return self.node_ids[name]

    def add_node(self, name: str, *, manifest: Path, data_dir: Path, state_dir: Path,
                 register: bool = True, warm: bool = False) -> LocalNode:
        """Register (unless ``register`` is False) and start the SuperNode ``name``."""
        files = {"manifest": manifest, "data_dir": data_dir, "state_dir": state_dir, "warm": warm}
        return self.add_nodes({name: files}, register=register)[0]

    def add_nodes(self, nodes: dict[str, dict[str, Any]], *, register: bool = True) -> list[LocalNode]:
        """Register (unless ``register`` is False) and start many SuperNodes; ``nodes``: name -> ``start_node``'s
        keywords. The keys are registered side by side (each registration is a `flwr` process)."""
        if register:
            for name in nodes:
                self.make_key(name)  # one at a time: they share the key folder
            with ThreadPoolExecutor(REGISTERING_AT_ONCE) as pool:
                list(pool.map(self.register, nodes))
        return self.start_nodes(nodes)

    def start_node(self, name: str, *, manifest: Path, data_dir: Path, state_dir: Path,
                   warm: bool = False) -> LocalNode:
        """Start (or restart, same key and state folder) the SuperNode ``name``; ``warm``: with the warm launcher."""
        files = {"manifest": manifest, "data_dir": data_dir, "state_dir": state_dir, "warm": warm}
        return self.start_nodes({name: files})[0]

    def start_nodes(self, nodes: dict[str, dict[str, Any]]) -> list[LocalNode]:
        """``start_node`` for many; every warm launcher is started before any is waited for (each imports the
        stack, seconds of CPU), and a launcher that does not come up stops them all."""
        for name in nodes:
            running = [p.process.pid for p in self.nodes[name].processes if p.process.poll() is None] \
                if name in self.nodes else []
            if running:
                raise DeployError(f"SuperNode {name!r} is already running (pids {running})")
        launchers: dict[str, _Launcher] = {}
        try:
            for name, files in nodes.items():
                if files.get("warm"):
                    launchers[name] = self._spawn_launcher(name)
            for name, launcher in launchers.items():
                launcher.wait(name)
        except BaseException:
            for launcher in launchers.values():
                launcher.process.stop()
            raise
        return [self._start_supernode(name, Path(files["manifest"]), Path(files["data_dir"]),
                                      Path(files["state_dir"]), launchers.get(name)) for name, files in nodes.items()]

    def _start_supernode(self, name: str, manifest: Path, data_dir: Path, state_dir: Path,
                         launcher: _Launcher | None) -> LocalNode:
        private, _ = self.make_key(name)
        port = free_port()
        self.node_ports.append(port)
        env = flower_env(self.node_home(name))
        if launcher is not None:  # its flwr-clientapp shim first on the SuperNode's PATH
            env = shim_path_env(launcher.bin_dir, env)
        process = start_process(
            [str(VENV_BIN / "flower-supernode"), "--root-certificates", str(self.certs["ca_cert"]),
             "--superlink", self.address, "--auth-supernode-private-key", str(private),
             "--host", "127.0.0.1", "--port", str(port),
             "--node-config", node_config_arg(manifest, data_dir, state_dir)],
            env, self.root / "logs" / f"supernode-{name}.log", cwd=self.root, niceness=self.device_niceness)
        self.nodes[name] = LocalNode(name, self.node_ids.get(name), port, self.node_home(name), process,
                                     launcher.process if launcher else None)
        return self.nodes[name]

    def node_home(self, name: str) -> Path:
        """The node's FLWR_HOME: each SuperNode installs the app in its own."""
        return self.root / "nodes" / name

    def _spawn_launcher(self, name: str) -> _Launcher:
        """Start ``edgemri client serve`` in the node's environment (``_Launcher.wait`` waits for it)."""
        folder = Path(tempfile.mkdtemp(prefix="edgemri-warm-"))  # short: Unix socket paths are limited
        self.warm_dirs.append(folder)
        socket_path, bin_dir = warm_paths(folder)
        process = start_process([str(VENV_BIN / "edgemri"), "client", "serve", "--dir", str(folder)],
                                flower_env(self.node_home(name)), self.root / "logs" / f"launcher-{name}.log",
                                cwd=self.root, niceness=self.device_niceness)
        return _Launcher(process, socket_path, bin_dir)

    def stop_node(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop a SuperNode and its ClientApp processes (SIGKILL: as if the device died).

        The SuperNode goes first, so that with SIGTERM its running tasks still reach it through the
        launcher's children; the launcher follows with whatever children it still has.
        """
        node = self.nodes[name]
        node.process.stop(sig)
        if node.launcher is not None:
            node.launcher.stop(sig)
            stop_group(node.launcher.process.pid)

    def node_status(self) -> dict[int, str]:
        """Node id -> status (registered, online, offline, ...) from `flwr supernode ls`."""
        done = subprocess.run([str(VENV_BIN / "flwr"), "supernode", "ls", self.connection, "--format", "json"],
                              env=self.env, capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(done.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError) as err:
            raise DeployError(f"`flwr supernode ls` gave no node list: {done.stdout[-500:]}{done.stderr[-500:]}") \
                from err
        return {int(n["node-id"]): str(n["status"]) for n in nodes}

    def wait_status(self, names: list[str], status: str, timeout_s: float = 90.0) -> None:
        """Wait until the SuperLink lists every named node with ``status``."""
        unregistered = [n for n in names if n not in self.node_ids]
        if unregistered:
            raise DeployError(f"nodes {unregistered} were never registered; the SuperLink lists no status for them")
        wanted = {self.node_ids[n] for n in names}
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.node_status()
            if all(current.get(n) == status for n in wanted):
                return
            for name in names:
                for node in self.nodes[name].processes:
                    if status == "online" and node.process.poll() is not None:
                        raise DeployError(f"SuperNode {name!r}: {node.process.args[0]} exited with "
                                          f"{node.process.returncode}; see {node.log}")
            if time.monotonic() > deadline:
                raise DeployError(f"nodes {names} not all {status} after {timeout_s:.0f} s: {current}")
            time.sleep(1.0)

    def run(self, app_dir: Path, run_config: dict[str, Any], log: Path, timeout_s: float = 900.0) -> RunOutcome:
        """`flwr run APP_DIR` on this deployment's TLS connection."""
        return flwr_run(app_dir, self.connection, self.env, log, run_config=run_config, timeout_s=timeout_s)

    @property
    def ports(self) -> list[int]:
        """Every port this deployment listened on: the SuperLink's and each SuperNode's."""
        return [self.port, *self.node_ports]

    def processes(self) -> list[psutil.Process]:
        """Live processes of this deployment: every flwr process inherits an FLWR_HOME under ``root``."""
        return processes_under(self.root)

    def leftovers(self) -> list[str]:
        """What still runs or listens: each live process of this deployment (its command) and each port of
        ``ports`` still bound. Empty after ``stop``."""
        running = [c for p in self.processes() if (c := _command(p))]
        return running + [f"port {port} is still bound" for port in self.ports if not port_free(port)]

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink, each with its child processes.

        A node that exited by itself (refused, crashed) can leave its SuperExec behind for
        a few seconds; the final sweep stops whatever still runs with this FLWR_HOME.
        """
        try:
            with ThreadPoolExecutor() as pool:  # each stop waits for its process tree to exit: stop them together
                list(pool.map(self.stop_node, list(self.nodes)))
        finally:
            self._stop_watching.set()
            if self._watchdog is not None:
                self._watchdog.join()
                self._watchdog = None
            if self.superexec is not None:
                self.superexec.stop()
            if self.link is not None:
                self.link.stop()
            for process in self.processes():
                try:
                    stop_group(os.getpgid(process.pid))
                except ProcessLookupError:
                    continue
            for folder in self.warm_dirs:
                shutil.rmtree(folder, ignore_errors=True)
