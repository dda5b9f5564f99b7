"""One training round behind one interface: plain Message-API rounds and SecAgg+ rounds.

The coordinator's loop calls a :class:`TrainRound` and gets a :class:`RoundResult` back -- the new values
of the trained adapter keys (or ``None``), every site's row, the bytes sent down, how many updates
counted and what failed -- without knowing how the round was aggregated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common.arrays import payload_bytes
from common.config import RunConfig
from server.replies import SiteReply, parse_train
from server.secagg import secagg_train_round
from server.strategy import Guard

__all__ = ["PlainRound", "RoundResult", "SecAggRound", "TrainRound", "make_round"]

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5  # between pulls of a round's missing replies (Flower's own send_and_receive: 3 s)


@dataclass
class RoundResult:
    """What one training round produced."""

    arrays: ArrayRecord | None  # new values of the keys the sites train; None: the adapter stays
    rows: list[SiteReply] = field(default_factory=list)
    bytes_down: int = 0
    accepted: int = 0  # updates that counted
    failure: str = ""  # aggregation failed: the run stops (checkpointed)


class TrainRound(Protocol):
    """Run training round ``rnd`` from the global ``arrays`` with the train ``request``."""

    def __call__(self, rnd: int, arrays: ArrayRecord, request: ConfigRecord) -> RoundResult: ...


class PlainRound:
    """Flower's Message API: the triage wrapper sees every update (``server.strategy.Guard``).

    Replies are pulled one message id at a time and triaged as they arrive, so the coordinator never
    holds more than one site's update in memory while the round runs (``server.fold``).
    """

    def __init__(self, grid: Grid, strategy: Guard, timeout: float, spill: Path | None = None) -> None:
        self.grid, self.strategy, self.timeout, self.spill = grid, strategy, timeout, spill

    def __call__(self, rnd: int, arrays: ArrayRecord, request: ConfigRecord) -> RoundResult:
        """Send, then triage each reply as it arrives, then aggregate."""
        messages = list(self.strategy.configure_train(rnd, arrays, request, self.grid))
        self.strategy.begin_train(self.spill)
        try:
            got = self._collect(messages)
            new = self.strategy.finish_train(rnd)[0]
        finally:
            self.strategy.close_train()
        rows = [*self.strategy.rows, *missing(rnd, messages, got, self.strategy, self.timeout)]
        failure = self.strategy.failure
        accepted = 0 if failure else sum(r.status == "trained" for r in rows)
        return RoundResult(new, rows, payload_bytes(arrays) * len(messages), accepted, failure)

    def _collect(self, messages: list[Message]) -> set[int]:
        """Push ``messages``; pull and admit each reply until all are in or the timeout passes.

        Returns the nodes that answered (each reply's content is dropped once admitted).
        """
        sent = list(self.grid.push_messages(messages))
        pending = [mid for mid in sent if mid]
        deadline = time.monotonic() + self.timeout
        got: set[int] = set()
        while pending:
            for mid in list(pending):
                replies = list(self.grid.pull_messages([mid]))
                if replies:
                    pending.remove(mid)
                while replies:  # no reference to a reply outlives its triage
                    reply = replies.pop()
                    got.add(reply.metadata.src_node_id)
                    self.strategy.admit(parse_train(reply))
                    del reply
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        return got


class SecAggRound:
    """Flower's SecAgg+: only the weighted sum of the updates is seen (``server.secagg``)."""

    def __init__(self, grid: Grid, strategy: Guard, cfg: RunConfig) -> None:
        self.grid, self.strategy, self.cfg = grid, strategy, cfg

    def __call__(self, rnd: int, arrays: ArrayRecord, request: ConfigRecord) -> RoundResult:
        """Pick the sites as a plain round would, then run the SecAgg+ protocol with them."""
        messages = list(self.strategy.configure_train(rnd, arrays, request, self.grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        new, rows = secagg_train_round(
            self.grid, self.cfg, rnd, arrays, request, nodes, names=self.strategy.registry.names
        )
        for row in rows:
            self.strategy.admit_row(row)
        accepted = sum(r.status == "trained" for r in rows) if new is not None else 0
        return RoundResult(new, rows, payload_bytes(arrays) * len(messages), accepted)


def make_round(grid: Grid, strategy: Guard, cfg: RunConfig) -> TrainRound:
    """The round the run config asks for."""
    if cfg.secagg.enabled:
        return SecAggRound(grid, strategy, cfg)
    return PlainRound(grid, strategy, cfg.round_timeout, Path(cfg.out_dir))


def missing(
    rnd: int, sent: list[Message], answered: set[int], strategy: Guard, timeout: float
) -> list[SiteReply]:
    """Sites that were asked and never answered (timed out or disconnected)."""
    rows = []
    for m in sent:
        node = m.metadata.dst_node_id
        if node not in answered:
            site = strategy.registry.name_of(node) or f"node-{node}"
            reason = f"no reply within round-timeout={timeout:g}s (site down or too slow)"
            log.warning("round %d: site %s failed: %s", rnd, site, reason)
            rows.append(SiteReply(node, site, "failed", reason))
    return rows
