"""Run the same ServerApp logic and ClientApp under Flower's simulation engine (Ray).

This is what ``flwr run .`` does too; going through ``run_simulation`` lets the CLI pass
its settings and get the summary back without a SuperLink in the background.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from common.config import RunConfig
from common.errors import FedtideError


def run_flower_simulation(config: RunConfig, client_app: Any = None) -> dict[str, Any]:
    """``config`` under Flower's simulation engine; its summary. ``client_app``: another
    ClientApp than fedtide's (with ``config``'s fault injection), e.g. a fuzzing one."""
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

    cpus = os.cpu_count() or 1
    backend_config = {
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app,
            client_app=client_app or faulty_client_app(config.faults),
            num_supernodes=config.data.clients,
            backend_config=backend_config,
        )
    if failure:
        raise failure[0]
    if not summary:
        raise FedtideError("Flower's simulation engine ended without finishing the run: see its log above")
    return summary
