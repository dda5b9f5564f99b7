"""ServerApp wiring: Flower's ``run_config`` in, ``server.coordinator`` does the run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.modeling import set_offline_env
from server.coordinator import RoundCallback, run_federation

set_offline_env()


def build_app(overrides: Mapping[str, Any] | None = None, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated by ``overrides``."""
    extra = dict(overrides or {})
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, {**context.run_config, **extra}, on_round=on_round)

    return server


app = build_app()
