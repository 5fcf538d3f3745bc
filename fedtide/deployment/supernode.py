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

Flower reads both values from module globals when it uses them; this module sets them, then
hands over to Flower's own entry point with the arguments it was given. Where a Flower
release moved them, the SuperNode runs with Flower's timings and a warning says so.
Run as ``python -m fedtide.deployment.supernode [flower-supernode arguments]``.
"""

from __future__ import annotations

import importlib
import sys

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


def main() -> None:
    missing = tune_flower()
    if missing:
        print(f"fedtide client: warning: this Flower has no {', '.join(missing)}: the SuperNode keeps Flower's "
              "timings (a restarted client may wait up to a minute to rejoin)", file=sys.stderr)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
