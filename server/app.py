"""The Flower ServerApp: Flower's Context in, one ``run_federation`` call."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.errors import FedtideError
from server.federation import run_federation
from server.grids import bound_reply_pulls

# run_config key beside the settings: go on with the run in `out` after its last checkpoint
RESUME_KEY = "resume"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = dict(context.run_config)
    resume = bool(settings.pop(RESUME_KEY, False))
    config = RunConfig.from_mapping(settings, toml=True)
    if config.faults.attack != "none":  # the wrapper that injects faults is the simulation runtimes' own
        raise FedtideError(f"attack = {config.faults.attack!r} is fault injection for `fedtide simulate` only: set attack = \"none\"")
    bound_reply_pulls(config.server.round_timeout / 2)
    run_federation(grid, config, resume=resume)
