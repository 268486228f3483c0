"""``edgemri deploy certs|keys|register``, ``edgemri client serve``: the steps of a real deployment (docs/DEPLOY.md)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

from edgemri.arguments import AtMost, BoundedInt, CommaList

Command = Callable[[argparse.Namespace], int]
AddCommand = Callable[[argparse._SubParsersAction, str, Command, str], argparse.ArgumentParser]

# The range of every count these commands take (edgemri.arguments); DAYS restates deploy.certs.MAX_DAYS (that
# module imports torch, too slow for --help; tests/test_cli.py checks they agree).
DAYS = BoundedInt(1, 3650)
MAX_HOSTS = 64  # names in the SuperLink's certificate
MAX_NODES = 1000  # devices a command makes keys for or registers
MAX_PRELOADS = 32  # modules the warm launcher imports


def cmd_certs(args: argparse.Namespace) -> int:
    from edgemri.deploy.certs import make_certs, parse_hosts

    paths = make_certs(Path(args.out), args.hosts, days=args.days)
    names = ", ".join(str(name.value) for name in parse_hosts(args.hosts))
    print(f"CA certificate  {paths['ca_cert']}  (copy to every SuperNode device and to the `flwr` user)")
    print(f"CA private key  {paths['ca_key']}  (0600; keep it off the SuperLink, it signs certificates)")
    print(f"SuperLink cert  {paths['server_cert']}  valid {args.days} days for {names}")
    print(f"SuperLink key   {paths['server_key']}  (0600; the SuperLink machine only)")
    print(f"start the SuperLink with: --ssl-ca-certfile {paths['ca_cert']} --ssl-certfile {paths['server_cert']} "
          f"--ssl-keyfile {paths['server_key']} --enable-supernode-auth")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from edgemri.deploy.nodes import make_node_keys

    for name, (private, public) in make_node_keys(Path(args.out), args.nodes).items():
        print(f"{name}: private key {private} (0600, stays on the device), public key {public} (register it)")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from edgemri.deploy.errors import DeployError
    from edgemri.deploy.nodes import check_node_names, node_key_paths, register_node
    from edgemri.simulation.flower_run import flower_env

    keys = Path(args.keys)
    names = args.nodes or sorted(p.stem for p in keys.glob("*.pub"))
    if not names:
        raise DeployError(f"no *.pub public keys in {keys}; make them with `edgemri deploy keys --out {keys}`")
    check_node_names(names)
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    env = flower_env(home)
    for name in names:
        node_id = register_node(node_key_paths(keys, name)[1], args.connection, env, name=name)
        print(f"{name}: registered as SuperNode {node_id} on {args.connection}")
    return 0


def cmd_client_serve(args: argparse.Namespace) -> int:
    from edgemri.deploy.warm import DEFAULT_PRELOAD, serve, warm_paths

    logging.getLogger().setLevel(logging.WARNING)  # the preloaded libraries' INFO chatter (alembic's plugins)
    logging.getLogger("edgemri").setLevel(logging.INFO)
    socket_path, bin_dir = warm_paths(Path(args.dir) if args.dir else None)
    serve(socket_path, bin_dir, preload=tuple(args.preload) or DEFAULT_PRELOAD)
    return 0


def register(commands: argparse._SubParsersAction, add: AddCommand) -> None:
    """Add ``deploy certs|keys|register`` and ``client serve`` to the ``edgemri`` command line."""
    deploy = commands.add_parser(
        "deploy", help="TLS certificates, SuperNode keys and registration for real devices (docs/DEPLOY.md)",
    ).add_subparsers(dest="deploy_command", required=True, metavar="SUBCOMMAND")
    certs = add(deploy, "certs", cmd_certs,
                "make a private CA and the SuperLink's TLS certificate and key (EC P-384)")
    certs.add_argument("--out", required=True, help="new or empty folder for ca.pem, ca.key, server.pem, server.key")
    certs.add_argument("--hosts", required=True, type=CommaList(str, MAX_HOSTS, "192.0.2.10,superlink.example.org"),
                       help=f"comma-separated IP addresses and DNS names SuperNodes use to reach the SuperLink, "
                            f"at most {MAX_HOSTS}, e.g. 192.0.2.10,superlink.example.org")
    certs.add_argument("--days", type=DAYS, default=825,
                       help=f"validity of the SuperLink certificate in days ({DAYS}, default 825)")

    keys = add(deploy, "keys", cmd_keys, "make one SuperNode authentication key pair per device (EC P-384, OpenSSH)")
    keys.add_argument("--out", required=True, help="folder for NAME.key (private) and NAME.pub (public)")
    keys.add_argument("--nodes", required=True, nargs="+", action=AtMost, most=MAX_NODES, metavar="NAME",
                      help=f"device names, at most {MAX_NODES}: 1-64 letters, digits, '.', '-' or '_', starting with "
                           f"a letter or digit")

    reg = add(deploy, "register", cmd_register,
              "register SuperNode public keys with the SuperLink (`flwr supernode register`)")
    reg.add_argument("--keys", required=True, help="folder holding NAME.pub files (from `edgemri deploy keys`)")
    reg.add_argument("--connection", required=True, help="connection name in FLWR_HOME/config.toml")
    reg.add_argument("--nodes", nargs="+", action=AtMost, most=MAX_NODES, metavar="NAME", default=None,
                     help=f"only these nodes, at most {MAX_NODES} (default: every .pub)")
    reg.add_argument("--flwr-home", default=None, help="Flower config folder (default: $FLWR_HOME or ~/.flwr)")

    client = commands.add_parser("client", help="run this device's ClientApps (docs/DEPLOY.md)").add_subparsers(
        dest="client_command", required=True, metavar="SUBCOMMAND")
    serve = add(client, "serve", cmd_client_serve,
                "warm ClientApp launcher beside a SuperNode: imports the stack once and runs each task in a child "
                "forked from it, through a flwr-clientapp shim first on the SuperNode's PATH")
    serve.add_argument("--dir", default=None,
                       help="private folder for the launcher's socket and bin/flwr-clientapp (default: "
                            "$FLWR_HOME/edgemri-warm, else ~/.flwr/edgemri-warm); start the SuperNode with "
                            "DIR/bin first on its PATH")
    serve.add_argument("--preload", action=AtMost, most=MAX_PRELOADS, default=[], metavar="MODULE",
                       help=f"module to import before the first task, repeatable, at most {MAX_PRELOADS} times "
                            f"(default: edgemri.clients.client_app and opacus; Flower's flwr-clientapp is always "
                            f"loaded)")
