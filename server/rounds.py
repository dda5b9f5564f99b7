"""One training round behind one interface: plain Message-API rounds and SecAgg+ rounds.

The coordinator's loop calls a :class:`TrainRound` and gets a :class:`RoundResult` back -- the new values
of the trained adapter keys (or ``None``), every site's row, the bytes sent down, how many updates
counted and what failed -- without knowing how the round was aggregated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common.arrays import payload_bytes
from common.config import RunConfig
from server.fold import UpdateStore
from server.replies import SiteReply, parse_train
from server.secagg import secagg_train_round
from server.strategy import Guard

__all__ = ["PlainRound", "RoundResult", "SecAggRound", "TrainRound", "make_round", "pull_each"]

log = logging.getLogger(__name__)
POLL_SECONDS, MAX_POLL_SECONDS = 0.2, 3.0  # between pulls of a round's missing replies


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
        if spill is not None:
            UpdateStore.sweep(spill)  # what a killed coordinator left of its last round

    def __call__(self, rnd: int, arrays: ArrayRecord, request: ConfigRecord) -> RoundResult:
        """Send, then triage each reply as it arrives, then aggregate."""
        messages = list(self.strategy.configure_train(rnd, arrays, request, self.grid))
        self.strategy.begin_train(self.spill)
        try:
            got = pull_each(self.grid, messages, self.timeout, lambda m: self.strategy.admit(parse_train(m)))
            new = self.strategy.finish_train(rnd)[0]
        finally:
            self.strategy.close_train()
        rows = [*self.strategy.rows, *missing(rnd, messages, got, self.strategy, self.timeout)]
        failure = self.strategy.failure
        accepted = 0 if failure else sum(r.status == "trained" for r in rows)
        return RoundResult(new, rows, payload_bytes(arrays) * len(messages), accepted, failure)


def pull_each(
    grid: Grid, messages: list[Message], timeout: float, take: Callable[[Message], None]
) -> set[int]:
    """Push ``messages``, then hand each reply to ``take`` as it arrives, until all are in or ``timeout``.

    Each message id is pulled on its own, so one call never brings more than one reply into memory,
    and no reference to a reply outlives ``take``. Polls every 0.2 s, backing off to 3 s (Flower's own
    ``send_and_receive`` sleeps 3 s between pulls) while nothing arrives. Returns the nodes that answered.
    """
    pending = [mid for mid in grid.push_messages(messages) if mid]
    deadline, delay = time.monotonic() + timeout, POLL_SECONDS
    got: set[int] = set()
    while pending:
        arrived = False
        for mid in list(pending):
            replies = list(grid.pull_messages([mid]))
            if replies:
                pending.remove(mid)
                arrived = True
            while replies:
                reply = replies.pop()
                got.add(reply.metadata.src_node_id)
                take(reply)
                del reply
        if not pending or time.monotonic() >= deadline:
            break
        delay = POLL_SECONDS if arrived else min(2 * delay, MAX_POLL_SECONDS)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
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
