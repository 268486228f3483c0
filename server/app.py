"""The Flower ServerApp: reads the run config, runs the round loop, writes the reports."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgemri.core.checkpoint import load_checkpoint
from edgemri.core.config import load_config
from edgemri.core.data import load_dataset
from edgemri.core.io import write_json
from edgemri.reports.federation import build_federation_report, write_federation_report
from edgemri.reports.privacy import build_privacy_report, write_privacy_report
from edgemri.server.federation import FederationServer

app = ServerApp()


def _log_through_flower() -> None:
    """Send edgemri's log lines where Flower sends its own (streamed to `flwr run`)."""
    ours, flower = logging.getLogger("edgemri"), logging.getLogger("flwr")
    ours.setLevel(logging.INFO)
    for handler in flower.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_through_flower()
    run_config = context.run_config
    config = load_config(str(run_config["config"]))
    run_dir = Path(str(run_config["run-dir"]))
    start = load_checkpoint(str(run_config["start-checkpoint"]))
    data_root = str(run_config.get("data-root", ""))
    central_test = load_dataset(data_root, cache_dir=config.data.cache_dir).test if data_root else None
    server = FederationServer(grid, config, run_dir, start.state_dict, central_test,
                              expected_clients=int(run_config["num-clients"]),
                              resume=bool(run_config.get("resume", False)))
    result = server.run()
    write_json(run_dir / "server" / "result.json", result)
    write_federation_report(build_federation_report(result, config.to_dict()), run_dir)
    write_privacy_report(build_privacy_report(result, config.to_dict()), run_dir)
