"""One machine, real processes: a TLS SuperLink with SuperNode authentication and real SuperNodes.

For tests, the benchmark and the one-machine walkthrough in docs/DEPLOY.md: every process
listens on 127.0.0.1 on a free port, in its own FLWR_HOME, and is stopped on exit. A node
started ``warm`` has the warm ClientApp launcher (``edgemri client serve``, deploy/warm.py)
beside it, and its SuperNode finds the launcher's ``flwr-clientapp`` shim first on its PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
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
    and starts a SuperNode in its own FLWR_HOME on its own port. Leaving the block stops
    every process it started (their ClientApp children included), also after a failure.
    """

    connection = "edgemri-local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.home = self.root / "flwr-home"  # the `flwr` CLI's home: the connection lives here
        self.env = flower_env(self.home)
        self.port = 0
        self.certs: dict[str, Path] = {}
        self.link: ManagedProcess | None = None
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
        self.link = start_process(
            [str(VENV_BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca_cert"]),
             "--ssl-certfile", str(self.certs["server_cert"]), "--ssl-keyfile", str(self.certs["server_key"]),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(self.port), "--database", str(self.root / "superlink.db")],
            self.env, self.root / "logs" / "superlink.log", cwd=self.root)
        wait_healthy(self.link, self.port, scheme="https")

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
        if register:
            self.register(name)
        return self.start_node(name, manifest=manifest, data_dir=data_dir, state_dir=state_dir, warm=warm)

    def start_node(self, name: str, *, manifest: Path, data_dir: Path, state_dir: Path,
                   warm: bool = False) -> LocalNode:
        """Start (or restart, same key and state folder) the SuperNode ``name``; ``warm``: with the warm launcher."""
        running = [p.process.pid for p in self.nodes[name].processes if p.process.poll() is None] \
            if name in self.nodes else []
        if running:
            raise DeployError(f"SuperNode {name!r} is already running (pids {running})")
        private, _ = self.make_key(name)
        home = self.root / "nodes" / name  # each SuperNode installs the app in its own FLWR_HOME
        port = free_port()
        self.node_ports.append(port)
        env, launcher = flower_env(home), None
        if warm:
            launcher, env = self._start_launcher(name, env)
        process = start_process(
            [str(VENV_BIN / "flower-supernode"), "--root-certificates", str(self.certs["ca_cert"]),
             "--superlink", self.address, "--auth-supernode-private-key", str(private),
             "--host", "127.0.0.1", "--port", str(port),
             "--node-config", node_config_arg(manifest, data_dir, state_dir)],
            env, self.root / "logs" / f"supernode-{name}.log", cwd=self.root)
        self.nodes[name] = LocalNode(name, self.node_ids.get(name), port, home, process, launcher)
        return self.nodes[name]

    def _start_launcher(self, name: str, env: dict[str, str]) -> tuple[ManagedProcess, dict[str, str]]:
        """Start ``edgemri client serve`` in the node's environment; wait for its socket; the SuperNode's env."""
        folder = Path(tempfile.mkdtemp(prefix="edgemri-warm-"))  # short: Unix socket paths are limited
        self.warm_dirs.append(folder)
        socket_path, bin_dir = warm_paths(folder)
        launcher = start_process([str(VENV_BIN / "edgemri"), "client", "serve", "--dir", str(folder)], env,
                                 self.root / "logs" / f"launcher-{name}.log", cwd=self.root)
        deadline = time.monotonic() + 120.0
        while not ((bin_dir / "flwr-clientapp").is_file() and socket_path.is_socket()):
            if launcher.process.poll() is not None or time.monotonic() > deadline:
                launcher.stop()
                raise DeployError(f"the warm launcher of {name!r} did not start; see {launcher.log}")
            time.sleep(0.2)
        return launcher, shim_path_env(bin_dir, env)

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

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink, each with its child processes.

        A node that exited by itself (refused, crashed) can leave its SuperExec behind for
        a few seconds; the final sweep stops whatever still runs with this FLWR_HOME.
        """
        try:
            with ThreadPoolExecutor() as pool:  # each stop waits for its process tree to exit: stop them together
                list(pool.map(self.stop_node, list(self.nodes)))
        finally:
            if self.link is not None:
                self.link.stop()
            for process in self.processes():
                try:
                    stop_group(os.getpgid(process.pid))
                except ProcessLookupError:
                    continue
            for folder in self.warm_dirs:
                shutil.rmtree(folder, ignore_errors=True)
