"""``edgemri deploy certs|keys|register``, ``edgemri client serve``: the steps of a real deployment (docs/DEPLOY.md)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

Command = Callable[[argparse.Namespace], int]
AddCommand = Callable[[argparse._SubParsersAction, str, Command, str], argparse.ArgumentParser]


def cmd_certs(args: argparse.Namespace) -> int:
    from edgemri.deploy.certs import make_certs, parse_hosts

    hosts = [h.strip() for h in args.hosts.split(",")]
    paths = make_certs(Path(args.out), hosts, days=args.days)
    names = ", ".join(str(name.value) for name in parse_hosts(hosts))
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
    from edgemri.deploy.warm import DEFAULT_PRELOAD, POLL_INTERVAL_S, serve

    serve(args.runtime_api_address, insecure=args.insecure, root_certificates=args.root_certificates,
          preload=tuple(args.preload) or DEFAULT_PRELOAD,
          poll_interval_s=POLL_INTERVAL_S if args.poll_interval is None else args.poll_interval)
    return 0


def register(commands: argparse._SubParsersAction, add: AddCommand) -> None:
    """Add ``deploy certs|keys|register`` and ``client serve`` to the ``edgemri`` command line."""
    deploy = commands.add_parser(
        "deploy", help="TLS certificates, SuperNode keys and registration for real devices (docs/DEPLOY.md)",
    ).add_subparsers(dest="deploy_command", required=True, metavar="SUBCOMMAND")
    certs = add(deploy, "certs", cmd_certs,
                "make a private CA and the SuperLink's TLS certificate and key (EC P-384)")
    certs.add_argument("--out", required=True, help="new or empty folder for ca.pem, ca.key, server.pem, server.key")
    certs.add_argument("--hosts", required=True,
                       help="comma-separated IP addresses and DNS names SuperNodes use to reach the SuperLink, "
                            "e.g. 192.0.2.10,superlink.example.org")
    certs.add_argument("--days", type=int, default=825,
                       help="validity of the SuperLink certificate in days (default: 825)")

    keys = add(deploy, "keys", cmd_keys, "make one SuperNode authentication key pair per device (EC P-384, OpenSSH)")
    keys.add_argument("--out", required=True, help="folder for NAME.key (private) and NAME.pub (public)")
    keys.add_argument("--nodes", required=True, nargs="+", metavar="NAME",
                      help="device names: 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit")

    reg = add(deploy, "register", cmd_register,
              "register SuperNode public keys with the SuperLink (`flwr supernode register`)")
    reg.add_argument("--keys", required=True, help="folder holding NAME.pub files (from `edgemri deploy keys`)")
    reg.add_argument("--connection", required=True, help="connection name in FLWR_HOME/config.toml")
    reg.add_argument("--nodes", nargs="+", metavar="NAME", default=None, help="only these nodes (default: every .pub)")
    reg.add_argument("--flwr-home", default=None, help="Flower config folder (default: $FLWR_HOME or ~/.flwr)")

    client = commands.add_parser("client", help="run this device's ClientApps (docs/DEPLOY.md)").add_subparsers(
        dest="client_command", required=True, metavar="SUBCOMMAND")
    serve = add(client, "serve", cmd_client_serve,
                "warm ClientApp launcher for a SuperNode started with --isolation process: imports the stack "
                "once, runs each task in a forked child")
    serve.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                       help="the SuperNode's Runtime API, its --host:--port (default: 127.0.0.1:9094)")
    security = serve.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true",
                          help="plain HTTP to the Runtime API (a SuperNode without --ssl-certfile, on loopback)")
    security.add_argument("--root-certificates", default=None, metavar="CA_PEM",
                          help="CA that signed the SuperNode's --ssl-certfile")
    serve.add_argument("--preload", action="append", default=[], metavar="MODULE",
                       help="module to import before the first task, repeatable (default: Flower's "
                            "flwr-clientapp entry point, edgemri.clients.client_app and opacus)")
    serve.add_argument("--poll-interval", type=float, default=None,
                       help="seconds between task polls, 0.01 to 60 (default: 0.5)")
