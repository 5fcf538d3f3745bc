"""The SuperNode that `fedtide client` runs: Flower's ``flower-supernode`` with two timings
made fit for a fleet whose processes get restarted.

- **Heartbeat** every few seconds instead of every ~20 s: the SuperLink lets a node's session
  expire after two missed heartbeat intervals, and until then refuses the same node key a new
  session. With Flower's default (30 s intervals) a client killed and started again waited up
  to a minute to train; with ``HEARTBEAT_SECONDS`` (Flower's minimum) it waits at most
  ``rejoin_wait_seconds()``.
- **Reconnection** pauses at most ``RECONNECT_PAUSE`` seconds instead of growing to 20 s: a
  restarted server (``fedtide server --resume``) sees its clients back within a few seconds,
  not after the first round after the resume has timed out.

- **One process, not two**: Flower's default isolation ("subprocess") starts a second
  long-lived process, ``flower-superexec``, whose only work is to ask the SuperNode every
  second for a task and start a ``flwr-clientapp`` process for it. That process imports most
  of Flower again (over 100 MB on an edge device). Here the SuperNode runs with isolation
  "process" (it starts no SuperExec) and runs Flower's own SuperExec loop in a thread of
  its own process instead: the ClientApp still runs in a process of its own, started the
  same way, with the same arguments.

Flower reads the timings from module globals when it uses them; this module sets them, then
hands over to Flower's own entry point with the arguments it was given. Where a Flower
release moved them, the SuperNode runs with Flower's timings and a warning says so; where it
moved the SuperExec, the SuperNode starts Flower's separate SuperExec process as before.
Run as ``python -m fedtide.deployment.supernode [flower-supernode arguments]``.
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import Any, Callable

from fedtide.deployment.wire_meter import install_from_environment

HEARTBEAT_SECONDS = 10  # the shortest interval a SuperLink accepts (Flower: 30)
HEARTBEAT_PATIENCE = 2  # missed intervals after which the SuperLink takes a node for gone
RECONNECT_PAUSE = 2  # longest pause between reconnection attempts, seconds (Flower: 20)

# (module, global): where Flower 1.42 reads each timing
_HEARTBEAT = (("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL"),
              ("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL"))
_RECONNECT = (("flwr.supercore.retry.http_retry", "MAX_RETRY_DELAY"),)


def rejoin_wait_seconds() -> int:
    """The longest a killed node's key stays refused by the SuperLink."""
    return HEARTBEAT_SECONDS * HEARTBEAT_PATIENCE


def tune_flower() -> list[str]:
    """Set the timings in Flower's modules; return the globals that were not found."""
    missing = []
    for places, value in ((_HEARTBEAT, HEARTBEAT_SECONDS), (_RECONNECT, RECONNECT_PAUSE)):
        for module_name, name in places:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                missing.append(f"{module_name}.{name}")
                continue
            if not hasattr(module, name):
                missing.append(f"{module_name}.{name}")
                continue
            setattr(module, name, value)
    return missing


def runtime_api_address(argv: list[str]) -> str:
    """Where the SuperNode's Runtime API listens, from its arguments (``--host``, ``--port``;
    Flower's defaults otherwise): the address its SuperExec asks for tasks."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

    values = {"--host": UVICORN_DEFAULT_HOST, "--port": str(SUPERNODE_UVICORN_DEFAULT_PORT)}
    for index, word in enumerate(argv):
        name, equals, value = word.partition("=")
        if name in values:
            values[name] = value if equals else argv[index + 1]
    host = f"[{values['--host']}]" if ":" in values["--host"] else values["--host"]
    return f"{host}:{values['--port']}"


def start_superexec_thread(address: str) -> threading.Thread | None:
    """Run Flower's SuperExec loop (``run_superexec``: ask the Runtime API at ``address`` for
    tasks, start a ``flwr-clientapp`` process for each) in a daemon thread of this process;
    None when this Flower has no such loop. The loop is Flower's own, with one change: a
    thread may not install signal handlers, so the SuperExec's exit handlers (closing its
    connection and executor) join the SuperNode's, which runs them when it exits."""
    try:
        superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
        from flwr.supercore.exit import add_exit_handler
    except ImportError:
        return None
    if not hasattr(superexec, "run_superexec") or not hasattr(superexec, "register_signal_handlers"):
        return None

    def exit_handlers_only(*args: Any, exit_handlers: list[Callable[[], None]] | None = None, **kwargs: Any) -> None:
        for handler in exit_handlers or []:
            add_exit_handler(handler)

    superexec.register_signal_handlers = exit_handlers_only
    # no TLS: the Runtime API listens on loopback without certificates, as when the SuperNode starts
    # `flower-superexec` itself
    thread = threading.Thread(target=superexec.run_superexec, name="superexec", daemon=True,
                              kwargs={"runtime_api_address": address, "insecure": True})
    thread.start()
    return thread


def main() -> None:
    missing = tune_flower()
    if missing:
        print(f"fedtide client: warning: this Flower has no {', '.join(missing)}: the SuperNode keeps Flower's "
              "timings (a restarted client may wait up to a minute to rejoin)", file=sys.stderr)
    from flwr.supernode.cli import flower_supernode

    install_from_environment()  # FEDTIDE_WIRE_LOG: count the bytes of every Fleet API call (benchmarks)
    arguments = sys.argv[1:]
    if "--isolation" not in arguments and start_superexec_thread(runtime_api_address(arguments)) is not None:
        arguments += ["--isolation", "process"]  # the SuperExec runs in this process: Flower starts none
    sys.argv = ["flower-supernode", *arguments]
    flower_supernode()


if __name__ == "__main__":
    main()
