"""Real clients on separate devices: TLS certificates, SuperNode keys, registration.

A deployment has one SuperLink (the server) reachable over TLS, and one SuperNode per
device, each started with its own node config (manifest, data folder, state folder)
and its own EC key. With SuperNode authentication on, the SuperLink accepts only nodes
whose public key was registered with ``flwr supernode register``. ``LocalDeployment``
does all of this on one machine with real processes (for tests, the benchmark and the
one-machine walkthrough in docs/DEPLOY.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgemri.core.errors import EdgemriError
from edgemri.core.io import write_bytes
from edgemri.simulation.flower_run import (
    VENV_BIN,
    ManagedProcess,
    RunOutcome,
    flower_env,
    flwr_run,
    free_port,
    start_process,
    stop_group,
    wait_healthy,
    write_connection,
)

# Flower's SuperNode authentication takes any NIST curve; its docs and `ssh-keygen -t ecdsa -b 384` use P-384.
NODE_KEY_CURVE = ec.SECP384R1()
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# The SuperLink's own ServerApp process (SuperExec) reaches it over loopback when it listens
# on 0.0.0.0, and verifies the certificate there too, so the certificate always names loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class DeployError(EdgemriError):
    """A deployment step cannot work as asked; the message names the bad value and the fix."""


# ---------------------------------------------------------------- certificates


def _general_name(host: str) -> x509.GeneralName:
    """An IPAddress SAN for an IP address, a DNSName SAN for a host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if re.fullmatch(r"[0-9.]+", host):
        raise DeployError(f"host {host!r} is not a valid IPv4 address")
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise DeployError(f"host {host!r} is neither an IP address nor a DNS name "
                          f"(letters, digits and '-' in dot-separated labels)")
    return x509.DNSName(host.rstrip(".").lower())


def parse_hosts(hosts: list[str]) -> list[x509.GeneralName]:
    """Validated subjectAltNames for the given hosts plus loopback, without duplicates."""
    if not hosts:
        raise DeployError("no hosts: name the SuperLink's address(es) as seen by the SuperNodes, "
                          "e.g. 192.0.2.10,superlink.example.org")
    names: list[x509.GeneralName] = []
    for host in [*hosts, *LOOPBACK_HOSTS]:
        if not host.strip():
            raise DeployError(f"empty host name in {hosts!r}")
        name = _general_name(host.strip())
        if name not in names:
            names.append(name)
    return names


def _empty_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose another --out "
                              f"(existing certificates and keys are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out: Path, hosts: list[str], *, days: int = 825) -> dict[str, Path]:
    """A private CA and a SuperLink certificate it signs, valid for every host (and loopback).

    Returns the paths ``ca_cert`` (give it to every SuperNode and to `flwr`), ``ca_key``
    (keep it offline: it can sign more certificates), ``server_cert`` and ``server_key``
    (for the SuperLink only). Private keys are written readable by the owner only.
    """
    if days < 1:
        raise DeployError(f"certificate validity must be >= 1 day, got {days}")
    names = parse_hosts(hosts)
    out = Path(out)
    _empty_folder(out)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgemri"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "edgemri federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days + 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    common_name = hosts[0].strip()[:64]  # X.509 caps CN at 64 characters; clients match the SANs anyway
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgemri"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": write_bytes(out / "ca.pem", ca_cert.public_bytes(pem), mode=0o644),
        "ca_key": write_bytes(out / "ca.key", _pem_key(ca_key), mode=0o600),
        "server_cert": write_bytes(out / "server.pem", server_cert.public_bytes(pem), mode=0o644),
        "server_key": write_bytes(out / "server.key", _pem_key(server_key), mode=0o600),
    }


# ---------------------------------------------------------------- SuperNode keys


def check_node_names(nodes: list[str]) -> None:
    if not nodes:
        raise DeployError("no node names: give one name per SuperNode, e.g. hospital-a phone-1")
    for name in nodes:
        if not _NODE_NAME.match(name):
            raise DeployError(f"node name {name!r} must be 1-64 letters, digits, '-' or '_'")
    duplicates = sorted({n for n in nodes if nodes.count(n) > 1})
    if duplicates:
        raise DeployError(f"node name(s) given twice: {', '.join(duplicates)}")


def node_key_paths(out: Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of a node: NAME.key (OpenSSH private) and NAME.pub (OpenSSH public)."""
    return Path(out) / f"{name}.key", Path(out) / f"{name}.pub"


def make_node_keys(out: Path, nodes: list[str]) -> dict[str, tuple[Path, Path]]:
    """One P-384 key pair per SuperNode, in the formats Flower reads.

    `flower-supernode --auth-supernode-private-key` loads an OpenSSH private key and
    `flwr supernode register` an OpenSSH public key (``ecdsa-sha2-nistp384 AAAA... NAME``),
    as `ssh-keygen -t ecdsa -b 384` writes them. Existing keys are never replaced: a
    registered node would lose its identity.
    """
    check_node_names(nodes)
    out = Path(out)
    existing = [str(p) for name in nodes for p in node_key_paths(out, name) if p.exists()]
    if existing:
        raise FileExistsError(f"key file(s) already exist: {', '.join(existing)}; a registered node keeps its key "
                              f"(remove the file to replace it, then register the new public key)")
    paths = {}
    for name in nodes:
        key = ec.generate_private_key(NODE_KEY_CURVE)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        private_path, public_path = node_key_paths(out, name)
        write_bytes(private_path, private, mode=0o600)
        write_bytes(public_path, public + f" {name}\n".encode(), mode=0o644)
        paths[name] = (private_path, public_path)
    return paths


def register_node(public_key: Path, connection: str, env: dict[str, str], *, name: str | None = None) -> int:
    """`flwr supernode register KEY.pub CONNECTION`; returns the node id the SuperLink assigned.

    ``env`` is a Flower environment (see ``flower_env``) whose FLWR_HOME/config.toml holds
    ``connection``. Registering a key twice is refused by the SuperLink.
    """
    if not Path(public_key).is_file():
        raise DeployError(f"public key {public_key} does not exist; make it with `edgemri deploy keys`")
    args = [str(VENV_BIN / "flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        reason = reply.get("error-message") or (done.stdout + done.stderr).strip()[-1500:]
        raise DeployError(f"could not register {public_key} on connection {connection!r}: {reason}")
    return int(reply["node-id"])


def node_config_arg(manifest: Path, data_dir: Path, state_dir: Path) -> str:
    """The SuperNode's --node-config value: where its manifest, data and state live on the device."""
    values = {"manifest": manifest, "data-dir": data_dir, "state-dir": state_dir}
    for key, path in values.items():
        if "'" in str(path):
            raise DeployError(f"{key} path {path} contains a single quote; Flower's --node-config cannot quote it")
    return " ".join(f"{key}='{Path(path).resolve()}'" for key, path in values.items())


# ---------------------------------------------------------------- one machine


@dataclass
class LocalNode:
    name: str
    node_id: int | None  # None: never registered
    port: int
    home: Path
    process: ManagedProcess


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
                 register: bool = True) -> LocalNode:
        """Register (unless ``register`` is False) and start the SuperNode ``name``."""
        if register:
            self.register(name)
        return self.start_node(name, manifest=manifest, data_dir=data_dir, state_dir=state_dir)

    def start_node(self, name: str, *, manifest: Path, data_dir: Path, state_dir: Path) -> LocalNode:
        """Start (or restart, same key and state folder) the SuperNode ``name``."""
        if name in self.nodes and self.nodes[name].process.process.poll() is None:
            raise DeployError(f"SuperNode {name!r} is already running (pid {self.nodes[name].process.process.pid})")
        private, _ = self.make_key(name)
        home = self.root / "nodes" / name  # each SuperNode installs the app in its own FLWR_HOME
        port = free_port()
        self.node_ports.append(port)
        process = start_process(
            [str(VENV_BIN / "flower-supernode"), "--root-certificates", str(self.certs["ca_cert"]),
             "--superlink", self.address, "--auth-supernode-private-key", str(private),
             "--host", "127.0.0.1", "--port", str(port),
             "--node-config", node_config_arg(manifest, data_dir, state_dir)],
            flower_env(home), self.root / "logs" / f"supernode-{name}.log", cwd=self.root)
        self.nodes[name] = LocalNode(name, self.node_ids.get(name), port, home, process)
        return self.nodes[name]

    def stop_node(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop a SuperNode and its ClientApp processes (SIGKILL: as if the device died)."""
        self.nodes[name].process.stop(sig)

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
                node = self.nodes[name].process
                if status == "online" and node.process.poll() is not None:
                    raise DeployError(f"SuperNode {name!r} exited with {node.process.returncode}; see {node.log}")
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
        found = []
        for process in psutil.process_iter():
            try:
                home = process.environ().get("FLWR_HOME")
                if home and Path(home).is_relative_to(self.root) and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink, each with its child processes.

        A node that exited by itself (refused, crashed) can leave its SuperExec behind for
        a few seconds; the final sweep stops whatever still runs with this FLWR_HOME.
        """
        try:
            with ThreadPoolExecutor() as pool:  # each stop waits for its process tree to exit: stop them together
                list(pool.map(lambda node: node.process.stop(), self.nodes.values()))
        finally:
            if self.link is not None:
                self.link.stop()
            for process in self.processes():
                try:
                    stop_group(os.getpgid(process.pid))
                except ProcessLookupError:
                    continue
