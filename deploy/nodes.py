"""A SuperNode's identity: its name, its EC key pair, its registration with the SuperLink, its node config.

With SuperNode authentication on, the SuperLink accepts only nodes whose public key was
registered with ``flwr supernode register``. Node names become file names (NAME.key,
NAME.pub) and Flower node names, so they match one strict pattern.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgemri.core.io import private_folder, write_bytes
from edgemri.deploy.errors import DeployError
from edgemri.simulation.flower_run import VENV_BIN

# Flower's SuperNode authentication takes any NIST curve; its docs and `ssh-keygen -t ecdsa -b 384` use P-384.
NODE_KEY_CURVE = ec.SECP384R1()
# Checked with fullmatch: `$` in re.match would also accept a name ending in a newline.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NODE_NAME_RULE = "1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"


def check_node_names(nodes: list[str]) -> None:
    if not nodes:
        raise DeployError("no node names: give one name per SuperNode, e.g. hospital-a phone-1")
    for name in nodes:
        if not NODE_NAME.fullmatch(name):
            raise DeployError(f"node name {name!r} must be {NODE_NAME_RULE}")
    duplicates = sorted({n for n in nodes if nodes.count(n) > 1})
    if duplicates:
        raise DeployError(f"node name(s) given twice: {', '.join(duplicates)}")


def node_key_paths(out: Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of a node: NAME.key (OpenSSH private) and NAME.pub (OpenSSH public)."""
    return Path(out) / f"{name}.key", Path(out) / f"{name}.pub"


def _key_pair(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(NODE_KEY_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {name}\n".encode()


def make_node_keys(out: Path, nodes: list[str]) -> dict[str, tuple[Path, Path]]:
    """One P-384 key pair per SuperNode, in the formats Flower reads.

    `flower-supernode --auth-supernode-private-key` loads an OpenSSH private key and
    `flwr supernode register` an OpenSSH public key (``ecdsa-sha2-nistp384 AAAA... NAME``),
    as `ssh-keygen -t ecdsa -b 384` writes them. Existing keys are never replaced: a
    registered node would lose its identity. A failed write removes what this call wrote.
    Modes are set whatever the umask, as ssh-keygen's: private keys 0600, public keys 0644, the
    folder 0700 (an existing one of this user's is tightened: anyone who could write in it could
    swap a public key before it is registered).
    """
    check_node_names(nodes)
    out = Path(out)
    paths = {name: node_key_paths(out, name) for name in nodes}
    existing = [str(p) for pair in paths.values() for p in pair if p.exists()]
    if existing:
        raise DeployError(f"key file(s) already exist: {', '.join(existing)}; a registered node keeps its key "
                          f"(remove the file to replace it, then register the new public key)")
    written: list[Path] = []
    try:
        private_folder(out, DeployError)
        for name, (private_path, public_path) in paths.items():
            private, public = _key_pair(name)
            written.append(write_bytes(private_path, private, mode=0o600))
            written.append(write_bytes(public_path, public, mode=0o644))
    except OSError as err:
        for path in written:
            path.unlink(missing_ok=True)
        raise DeployError(f"cannot write keys to {out}: {err.strerror or err}") from None
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
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DeployError(f"could not run `flwr supernode register` for {public_key}: {err}") from None
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = None
    reply = reply if isinstance(reply, dict) else {}
    node_id = str(reply.get("node-id", ""))
    if done.returncode != 0 or not reply.get("success") or not node_id.isdigit():
        reason = reply.get("error-message") or (done.stdout + done.stderr).strip()[-1500:]
        raise DeployError(f"could not register {public_key} on connection {connection!r}: {reason}")
    return int(node_id)


def node_config_arg(manifest: Path, data_dir: Path, state_dir: Path) -> str:
    """The SuperNode's --node-config value: where its manifest, data and state live on the device."""
    values = {"manifest": manifest, "data-dir": data_dir, "state-dir": state_dir}
    for key, path in values.items():
        if "'" in str(path):
            raise DeployError(f"{key} path {path} contains a single quote; Flower's --node-config cannot quote it")
    return " ".join(f"{key}='{Path(path).resolve()}'" for key, path in values.items())
