"""The Flower ServerApp: Flower's Context in, one ``run_federation`` call, nothing else."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.federation import run_federation

# run_config key beside the settings: go on with the run in `out` after its last checkpoint
RESUME_KEY = "resume"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = dict(context.run_config)
    resume = bool(settings.pop(RESUME_KEY, False))
    run_federation(grid, RunConfig.from_mapping(settings), resume=resume)
