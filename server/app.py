"""The Flower ServerApp: Flower's Context in, one ``run_federation`` call, nothing else."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_mapping(context.run_config))
