"""``flwr-clientapp`` for a SuperNode whose ClientApp tasks the warm launcher runs (deploy/warm.py).

``warm.write_shim`` copies this file into the launcher's ``bin/`` folder as ``flwr-clientapp``,
behind a first line that runs it with the launcher's interpreter in isolated mode (``-I -S``: no
environment, no site-packages, a fast start), and writes its settings beside it
(``flwr-clientapp.json``: the launcher's socket and Flower's real command). The SuperExec starts
it as it would Flower's command; it hands its arguments, working folder, environment and standard
streams (file descriptors) to the launcher and exits with the task's exit code. When no launcher
takes the task, it runs the real command in its place (cold).

The launcher answers one line, ``error ...`` (nothing ran) or ``started PID``, then ``exit CODE``
when the task's child ended. The standard library only: the shim starts once per message, and
isolated mode sees nothing else. The launcher takes its side of the protocol from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys

COMMAND = "flwr-clientapp"
MAGIC = b"EDGEMRI-WARM-1\n"
HEADER = struct.Struct(">I")  # the request's length, after MAGIC
SETTINGS_SUFFIX = ".json"  # the settings file is the shim's path plus this
MAX_LINE_BYTES = 4096
# From the connection on, the whole request must arrive within this; the launcher drops a caller that is slower,
# and the shim gives up on a launcher that does not take it (stopped, say) and runs the task cold.
REQUEST_TIMEOUT_S = 5.0
MESSAGE_PREFIX = f"{COMMAND} (edgemri warm launcher): "


def run_cold(real: str) -> None:
    """Become Flower's own command, with this process's arguments."""
    os.execv(real, [real, *sys.argv[1:]])


def read_settings(shim: str) -> tuple[str, str]:
    """(the launcher's socket, Flower's real command) from the settings file beside ``shim``."""
    try:
        with open(shim + SETTINGS_SUFFIX, encoding="utf-8") as file:
            settings = json.load(file)
        return str(settings["socket"]), str(settings["real"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"{MESSAGE_PREFIX}cannot read {shim}{SETTINGS_SUFFIX} ({err.__class__.__name__}); "
              "run edgemri client serve again to rewrite it", file=sys.stderr)
        sys.exit(2)


def task_exit_code(line: str) -> int | None:
    """The exit code in the launcher's ``exit CODE`` line; a child killed by signal N exits 128 + N, as a shell says."""
    if not line.startswith("exit ") or not line[5:].lstrip("-").isdigit():
        return None
    code = int(line[5:])
    return code if code >= 0 else 128 - code


def main() -> None:
    socket_path, real = read_settings(__file__)
    body = json.dumps({"argv": [COMMAND, *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    try:
        launcher = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        launcher.settimeout(REQUEST_TIMEOUT_S)  # a request not sent in time was not taken: running it cold is safe
        launcher.connect(socket_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused unread (busy): its reply says why
            socket.send_fds(launcher, [MAGIC + HEADER.pack(len(body))], [0, 1, 2])
            launcher.sendall(body)
        launcher.settimeout(None)  # the task itself takes as long as it takes
        reply = launcher.makefile("rb")
        first = reply.readline(MAX_LINE_BYTES)
    except OSError:  # no launcher listens, or it took no request in time: the task runs cold
        run_cold(real)
    if not first.startswith(b"started "):
        if first:
            print(f"{MESSAGE_PREFIX}{first.decode('utf-8', 'replace').strip()}; running the task cold", file=sys.stderr)
        run_cold(real)
    try:
        last = reply.readline(MAX_LINE_BYTES).decode("ascii", "replace").strip()
    except OSError:
        last = ""
    code = task_exit_code(last)
    if code is not None:
        sys.exit(code)
    print(f"{MESSAGE_PREFIX}the launcher went away during the task ({first.decode('ascii', 'replace').strip()})",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
