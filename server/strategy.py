"""The coordinator's strategy: a triage wrapper (:class:`Guard`) around Flower's aggregation.

As Flower's DP wrappers do, :class:`Guard` wraps any Message-API strategy. Outbound, each node's request
names the last ledger entry the coordinator saw from that node's site. Inbound, each reply is triaged as
it arrives (:meth:`Guard.admit`): parsed into a typed form (:mod:`server.replies`), checked -- identity
(:mod:`server.registry`), exact adapter keys, shapes, dtypes, the signed receipt (hash, signature, round,
the update's SHA-256), then in one decoding pass finite values and the norm against the round's global
adapter (decoded once per round) -- and its update stored on disk (:mod:`server.fold`), the reply dropped.
Once the round's replies are in, :meth:`Guard.finish_train` applies the median-relative norm bound and
the weight cap and aggregates: plain FedAvg folded from the store one update at a time (memory does not
grow with the number of sites), robust aggregators and site-level DP given clean in-memory messages
carrying only the update and its weight. No reply can make Flower's aggregation raise; a failure inside
aggregation anyway is caught and reported (``failure``), and the coordinator stops with a checkpoint
instead of crashing after budgets were spent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common.arrays import ArraySpec, check_layout, decoded_tensors, update_sha256
from privacy.keys import public_key_from_pem, verifier_for
from privacy.ledger_entries import canonical_bytes, entry_hash
from server.aggregators import AGGREGATIONS, WEIGHT, SiteLevelDP, build_strategy
from server.fold import UpdateStore, capped_weights, fedavg
from server.registry import SiteRegistry
from server.replies import SiteReply, TrainReply, parse_evaluate, parse_train

__all__ = [
    "AGGREGATIONS",
    "Guard",
    "SiteLevelDP",
    "UpdateRules",
    "build_strategy",
    "capped_weights",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateRules:
    """What an acceptable update of one run looks like, and how updates are weighted."""

    template: dict[str, ArraySpec]
    run_id: str
    max_update_norm: float = 0.0  # L2 bound on (update - global); 0 = off
    update_norm_ratio: float = 0.0  # bound relative to the round's median update norm; 0 = off
    max_num_examples: int = 100_000_000
    weighting: str = "num-examples"  # or "equal"
    max_weight_share: float = 1.0  # no site's share of the aggregate above this (1 = off)
    train_kind: str = "sft"  # what the run asked every site to train


class Guard(Strategy):
    """Triage in front of ``inner``; ``rows`` holds every site's answer of the last phase."""

    def __init__(
        self, inner: Strategy, rules: UpdateRules, registry: SiteRegistry, *, equal_weights: bool = False
    ) -> None:
        self.inner = inner
        self.rules = rules
        self.registry = registry
        self.equal_weights = equal_weights
        self.rows: list[SiteReply] = []
        self.failure = ""
        self._global: dict[str, np.ndarray] = {}
        self._store: UpdateStore | None = None
        self._parsed: list[TrainReply] = []
        self._round = 0
        self._connected: set[int] = set()

    def summary(self) -> None:
        """Flower's strategy summary of the inner strategy."""
        self.inner.summary()

    # ------------------------------------------------------------------ outbound
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, each naming the last ledger entry seen from its node's site."""
        self._round, self._connected = server_round, set(grid.get_node_ids())
        self._global = {k: a.numpy() for k, a in arrays.items()}  # deserialized once per round (float32)
        return [
            self._personal(m, arrays) for m in self.inner.configure_train(server_round, arrays, config, grid)
        ]

    def _personal(self, msg: Message, arrays: ArrayRecord) -> Message:
        node = msg.metadata.dst_node_id
        seq, digest = self.registry.head_for(node)
        config = ConfigRecord(
            {**msg.content.config_records["config"], "ledger-seq": seq, "ledger-hash": digest}
        )
        content = RecordDict({"arrays": arrays, "config": config})
        return Message(content, dst_node_id=node, message_type=msg.metadata.message_type)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Unchanged: evaluation spends no budget."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    # ------------------------------------------------------------------ inbound
    @property
    def streams(self) -> bool:
        """Whether accepted updates are folded one at a time (plain FedAvg) rather than all at once."""
        return type(self.inner) is FedAvg

    def begin_train(self, spill: Path | None = None) -> None:
        """Start collecting a round's replies; accepted updates are kept under ``spill`` (a disk folder)."""
        self.close_train()
        self._store, self._parsed, self.failure = UpdateStore(spill), [], ""

    def admit(self, p: TrainReply) -> None:
        """Triage one parsed reply as it arrives: its update is decoded once, checked, stored, dropped."""
        if self._store is None:
            self.begin_train()
        row = p.row
        if row.site.startswith("node-"):
            row.site = self.registry.name_of(row.node_id) or row.site
        if row.status in ("trained", "refused"):
            problem = self._check(p)
            if problem:
                row.reject(problem)
            else:
                self.registry.record(row)
        p.arrays = None  # the values live in the store now (or the update did not count)
        self._parsed.append(p)

    def finish_train(self, server_round: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate what :meth:`admit` accepted this round, in a fixed order, and forget the round."""
        try:
            return self._aggregate(server_round)
        finally:
            self.close_train()

    def close_train(self) -> None:
        """Delete the round's stored updates."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Triage every reply, then aggregate the accepted updates (Flower's Strategy interface)."""
        self.begin_train()
        parsed = [parse_train(m) for m in replies]
        parsed.sort(key=lambda p: (self.registry.name_of(p.row.node_id) or p.row.site, p.row.node_id))
        for p in parsed:
            self.admit(p)
        return self.finish_train(server_round)

    def _aggregate(self, server_round: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        store = self._store
        assert store is not None
        parsed = sorted(self._parsed, key=lambda p: (p.row.site, p.row.node_id))  # a fixed summation order
        accepted = self._outliers([p for p in parsed if p.row.status == "trained" and _name(p) in store])
        self.rows = [p.row for p in parsed]
        for row in self.rows:
            if row.status != "trained":
                log.warning("round %d: site %s %s: %s", server_round, row.site, row.status, row.reason)
        if not accepted:
            return None, None
        weights = [1.0 if self.equal_weights else self._weight(p.row) for p in accepted]
        if not self.equal_weights:
            weights = capped_weights(weights, self.rules.max_weight_share)
        names = [_name(p) for p in accepted]
        if self.streams:
            return self._safely(
                "aggregate_train",
                lambda: (fedavg(store, names, weights, self.rules.template), None),
                (None, None),
            )
        clean = [  # robust aggregators and site-level DP need every update at once
            Message(
                RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT: w})}),
                dst_node_id=p.row.node_id,
                message_type="train",
            )
            for p, w, arrays in zip(accepted, weights, store.records(names), strict=True)
        ]
        return self._safely(
            "aggregate_train", lambda: self.inner.aggregate_train(server_round, clean), (None, None)
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Typed evaluate replies from known sites only, then the inner strategy's weighted mean."""
        parsed = [parse_evaluate(m) for m in replies]
        clean = []
        for p in parsed:
            bound = self.registry.name_of(p.row.node_id)
            if p.row.site.startswith("node-") and bound:
                p.row.site = bound
            problem = (
                self.registry.identity(p.row.node_id, p.row.site, self._connected)
                if p.row.status == "evaluated"
                else ""
            )
            if problem:
                p.row.reject(problem)
                p.row.site = bound or f"node-{p.row.node_id}"
            if p.row.status == "evaluated":
                metrics = MetricRecord({"eval-loss": p.loss, WEIGHT: float(p.num_examples)})
                clean.append(
                    Message(
                        RecordDict({"metrics": metrics}), dst_node_id=p.row.node_id, message_type="evaluate"
                    )
                )
            else:
                log.warning(
                    "round %d: site %s evaluation %s: %s",
                    server_round,
                    p.row.site,
                    p.row.status,
                    p.row.reason,
                )
        self.rows = [p.row for p in parsed]
        if not clean:
            return None
        return self._safely(
            "aggregate_evaluate", lambda: self.inner.aggregate_evaluate(server_round, clean), None
        )

    def _safely(self, what: str, fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # a crash here would lose every site's spent round: report it
            log.exception("%s failed", what)
            self.failure = f"{what} failed: {type(exc).__name__}: {exc}"
            return default

    # ------------------------------------------------------------------ checks
    def admit_row(self, row: SiteReply) -> None:
        """Identity and receipt checks of a reply whose update this coordinator cannot see (SecAgg+)."""
        if row.status not in ("trained", "refused"):
            return
        problem = self._receipt(row) or self._identity(row)
        if problem:
            row.reject(problem + " (under SecAgg+ its masked update is already in the sum)")
            log.error("round %d: site %s: %s", self._round, row.site, row.reason)
        else:
            self.registry.record(row)

    def _identity(self, row: SiteReply) -> str:
        """The registry's verdict; a reply that spoke for another site is filed under its own node."""
        problem = self.registry.check(row, self._connected)
        bound = self.registry.name_of(row.node_id)
        if problem and bound != row.site:
            row.site = bound or f"node-{row.node_id}"
        return problem

    def _weight(self, row: SiteReply) -> float:
        n = row.metrics["num-examples"]
        return 1.0 if self.rules.weighting == "equal" else float(min(n, self.rules.max_num_examples))

    def _check(self, p: TrainReply) -> str:
        """Why a well-formed reply may not count ('' when it may)."""
        row, rules = p.row, self.rules
        problem = self._receipt(row) or self._identity(row)
        if problem or row.status != "trained" or p.arrays is None:
            return problem
        if row.train_kind != rules.train_kind:
            return f"the site trained {row.train_kind} but the run asked for {rules.train_kind}"
        problems = check_layout(p.arrays, rules.template)
        n = row.metrics["num-examples"]
        if not 0 < n <= rules.max_num_examples:
            problems.append(f"num-examples {n:g} is not a count in (0, {rules.max_num_examples}]")
        if problems:
            return "; ".join(problems)
        if row.receipt.get("update_sha256") != update_sha256(p.arrays):
            return "the update does not match the ledger receipt sent with it"
        assert self._store is not None
        try:  # decoded once (float32, whatever the wire precision): finite check, norm, store
            self._store.put(_name(p), self._scan(p.arrays, row))
        except ValueError as exc:
            return str(exc)
        return ""

    def _scan(self, arrays: ArrayRecord, row: SiteReply) -> Iterator[tuple[str, np.ndarray]]:
        """The update's decoded tensors; its norm against the round's global adapter goes in the row."""
        total = 0.0
        for key, values in decoded_tensors(arrays, self.rules.template):
            if self._global:
                diff = (values - self._global[key]).ravel()
                total += float(np.dot(diff, diff))  # BLAS, float32 partial sums: ~1e-6 relative
            yield key, values
        if self._global:
            norm = row.metrics["update-norm"] = float(np.sqrt(total))
            bound = self.rules.max_update_norm
            if bound > 0 and norm > bound:
                raise ValueError(f"update norm {norm:.4g} exceeds the bound max-update-norm={bound:g}")

    def _receipt(self, row: SiteReply) -> str:
        """The receipt must be an intact, signed (when the site has a key) entry answering this request."""
        r = row.receipt
        want = "commit" if row.status == "trained" else "refuse"
        if not r:
            return f"no ledger receipt (a {want} entry) came with the reply"
        if r.get("hash") != entry_hash(r):
            return "the receipt does not match its own hash: it was altered"
        if row.public_key:
            key = public_key_from_pem(row.public_key)
            sig = r.get("signature")
            if key is None or not isinstance(sig, str) or not verifier_for(key)(canonical_bytes(r), sig):
                return "the receipt is not signed with the ledger key the site sent"
        if r.get("kind") != want:
            return f"the receipt is a {r.get('kind')!r} entry, not a {want}"
        if (r.get("round"), r.get("run_id")) != (self._round, self.rules.run_id):
            return (
                f"the receipt is for run {r.get('run_id')!r} round {r.get('round')}, not this round "
                f"({self.rules.run_id!r} round {self._round}): a replayed answer"
            )
        return ""

    def _outliers(self, accepted: list[TrainReply]) -> list[TrainReply]:
        """Reject updates whose norm is over ``update_norm_ratio`` x the round's median (3+ updates)."""
        if self.rules.update_norm_ratio <= 0 or not self._global or len(accepted) < 3:
            return accepted
        norms = [p.row.metrics["update-norm"] for p in accepted]
        bound = self.rules.update_norm_ratio * float(np.median(norms))
        kept = []
        for p, norm in zip(accepted, norms, strict=True):
            if norm > bound:
                p.row.reject(
                    f"update norm {norm:.4g} is over update-norm-ratio={self.rules.update_norm_ratio:g} x "
                    "the "
                    f"round's median update norm ({bound:.4g})"
                )
            else:
                kept.append(p)
        return kept


def _name(p: TrainReply) -> str:
    """The key of a reply's update in the round's store (one reply per node per round)."""
    return f"{p.row.node_id}-{id(p)}"
