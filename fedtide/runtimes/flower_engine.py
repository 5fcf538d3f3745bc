"""Run the same ServerApp logic and ClientApp under Flower's simulation engine (Ray).

This is what ``flwr run .`` does too; going through ``run_simulation`` lets the CLI pass
its settings and get the summary back without a SuperLink in the background.

By default Ray starts on this machine, with all its cores. With ``RayCluster.address`` the
run joins a Ray cluster the user already has (``ray start --head`` on one machine,
``ray start --address HEAD:PORT`` on the others): Flower spreads the clients' actors over
every node's CPUs and GPUs, ``client_cpus`` and ``client_gpus`` to each client. Every node
must hold the same Python, Ray, fedtide and data paths: the clients import fedtide from the
paths this process has (passed to the workers as PYTHONPATH) and read data from the same
``--data-dir``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from common.config import RunConfig
from common.errors import FedtideError

MAX_CLIENT_CPUS = 1024
MAX_CLIENT_GPUS = 64
MIN_CLIENT_CPUS = 0.05  # Flower starts (node CPUs / client CPUs) actors per node up front, each importing torch
MIN_CLIENT_GPUS = 0.01
_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9._\-]{1,253}:[0-9]{1,5}|(ray://)?\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5})$")


@dataclass(frozen=True)
class RayCluster:
    """Where Flower's simulation engine runs: ``address`` None starts Ray here; otherwise the
    address of a running cluster's head (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``).
    ``client_cpus`` and ``client_gpus``: what Ray reserves for each client (fractions allowed)."""

    address: str | None = None
    client_cpus: float = 1.0
    client_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.address is not None and (not _ADDRESS.match(self.address) or not _port_ok(self.address)):
            raise FedtideError(
                f"--ray-address '{self.address[:80]}' is not a Ray cluster address: give the head node's HOST:PORT "
                "(as `ray start --head` printed it, e.g. 10.0.0.5:6379), ray://HOST:PORT or auto"
            )
        for flag, value, high in (("--client-cpus", self.client_cpus, MAX_CLIENT_CPUS),
                                  ("--client-gpus", self.client_gpus, MAX_CLIENT_GPUS)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= high:
                raise FedtideError(f"{flag} must be a number between 0 and {high} (got {value!r})")
        if self.client_cpus < MIN_CLIENT_CPUS:
            raise FedtideError(f"--client-cpus must be at least {MIN_CLIENT_CPUS} (got {self.client_cpus}): Flower "
                               "starts a worker process for every share of a CPU; e.g. 0.5 runs two clients per core")
        if 0 < self.client_gpus < MIN_CLIENT_GPUS:
            raise FedtideError(f"--client-gpus must be 0 or at least {MIN_CLIENT_GPUS} (got {self.client_gpus})")

    def init_args(self) -> dict[str, Any]:
        """``ray.init``'s arguments. Joining a cluster, the cluster's resources stand: Ray refuses
        ``num_cpus`` then."""
        common = {"include_dashboard": False, "logging_level": logging.ERROR}
        if self.address is None:
            return {"num_cpus": os.cpu_count() or 1, **common}
        return {"address": self.address, **common}

    def client_resources(self) -> dict[str, float]:
        return {"num_cpus": float(self.client_cpus), "num_gpus": float(self.client_gpus)}


def _port_ok(address: str) -> bool:
    return address == "auto" or 0 < int(address.rsplit(":", 1)[1]) < 65536


def start_ray(cluster: RayCluster) -> None:
    """Start Ray here or join ``cluster``; FedtideError when it cannot be reached or no node
    can hold one client with its resources (Ray would wait for one forever)."""
    import ray

    if cluster.address is not None and cluster.address != "auto":
        _reachable(cluster.address)
    if ray.is_initialized():
        ray.shutdown()
    # the clients import fedtide from this process's paths, on every node (as Flower passes them)
    pythonpath = os.pathsep.join(dict.fromkeys(p for p in sys.path if p))
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **cluster.init_args())
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:
        where = f"the Ray cluster at {cluster.address}" if cluster.address else "Ray on this machine"
        hint = (" Is it running (`ray start --head --port PORT` printed the address), with the same Ray version as "
                "here?" if cluster.address else "")
        raise FedtideError(f"could not start or join {where}: {str(err).splitlines()[0][:300]}.{hint}") from None
    fits = sum(_clients_on(node.get("Resources") or {}, cluster) for node in ray.nodes() if node.get("Alive", True))
    if fits == 0:
        largest = max((n.get("Resources") or {} for n in ray.nodes()), key=lambda r: r.get("CPU", 0), default={})
        ray.shutdown()
        raise FedtideError(
            f"no node of the Ray cluster can hold a client with --client-cpus {cluster.client_cpus:g} and "
            f"--client-gpus {cluster.client_gpus:g} (largest node: {largest.get('CPU', 0):g} CPUs, "
            f"{largest.get('GPU', 0):g} GPUs): lower them"
        )


def _reachable(address: str, seconds: float = 10.0) -> None:
    """FedtideError unless something listens at ``address`` (Ray would retry for minutes)."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
            pass
    except OSError as err:
        raise FedtideError(
            f"could not start or join the Ray cluster at {address}: nothing answers there ({err.strerror or err}). "
            "Start it first (`ray start --head --port PORT` on the head machine) and pass the address it printed"
        ) from None


def _clients_on(resources: dict[str, float], cluster: RayCluster) -> int:
    """How many clients one node with ``resources`` holds at once."""
    count = int(resources.get("CPU", 0) // cluster.client_cpus)
    if cluster.client_gpus > 0:
        count = min(count, int(resources.get("GPU", 0) // cluster.client_gpus))
    return count


def run_flower_simulation(config: RunConfig, client_app: Any = None, cluster: RayCluster | None = None) -> dict[str, Any]:
    """``config`` under Flower's simulation engine; its summary. ``client_app``: another
    ClientApp than fedtide's (with ``config``'s fault injection), e.g. a fuzzing one;
    ``cluster``: where Ray runs (default: here)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.faults import faulty_client_app
    from server.federation import quiet_flower_logs, run_federation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    summary: dict[str, Any] = {}
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_flower_logs()
        try:
            summary.update(run_federation(grid, config))
        except BaseException as err:  # re-raised below, outside Flower's thread
            failure.append(err)

    cluster = cluster or RayCluster()
    start_ray(cluster)
    backend_config = {"init_args": cluster.init_args(), "client_resources": cluster.client_resources()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app or faulty_client_app(config.faults),
                num_supernodes=config.data.clients,
                backend_config=backend_config,
            )
    finally:  # Flower shuts Ray down once its backend started; not when it failed before
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if failure:
        raise failure[0]
    if not summary:
        raise FedtideError("Flower's simulation engine ended without finishing the run: see its log above")
    return summary
