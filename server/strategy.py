"""The coordinator's strategy: a triage wrapper (:class:`Guard`) around Flower's aggregation.

As Flower's DP wrappers do, :class:`Guard` wraps any Message-API strategy. Outbound, each node's request
names the last ledger entry the coordinator saw from that node's site. Inbound, every reply is parsed into
a typed form (:mod:`server.replies`), checked -- identity (:mod:`server.registry`), exact adapter keys,
shapes, dtypes, finite values, the signed receipt (hash, signature, round, the update's SHA-256),
absolute and median-relative norm bounds -- and only then rebuilt as a clean message carrying the update
and the weight the run's weighting rule gives it. The inner strategy never sees a site's own records, so
no reply can make Flower's aggregation raise; a failure inside aggregation anyway is caught and reported
(``failure``), and the coordinator stops with a checkpoint instead of crashing after budgets were spent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from common.arrays import ArraySpec, check_update, to_float32, update_sha256
from common.errors import ConfigError
from privacy.keys import public_key_from_pem, verifier_for
from privacy.ledger_entries import canonical_bytes, entry_hash
from server.registry import SiteRegistry
from server.replies import SiteReply, TrainReply, parse_evaluate, parse_train

__all__ = [
    "AGGREGATIONS",
    "Guard",
    "SiteLevelDP",
    "UpdateRules",
    "build_strategy",
    "capped_weights",
    "update_norm",
]

log = logging.getLogger(__name__)
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
WEIGHT = "weight"  # the only metric the inner strategy sees


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


def capped_weights(weights: list[float], cap: float) -> list[float]:
    """``weights`` rescaled so that none is above ``cap`` of the total (water-filling; sums kept)."""
    total = sum(weights)
    if total <= 0 or cap >= 1 or not weights:
        return list(weights)
    if cap * len(weights) <= 1:  # no feasible cap above the equal share: equal weights
        return [total / len(weights)] * len(weights)
    w = list(weights)
    for _ in range(len(w)):
        capped = [i for i, x in enumerate(w) if x >= cap * total - 1e-12]
        free = [i for i in range(len(w)) if i not in capped]
        free_sum = sum(w[i] for i in free)
        if free_sum <= 0:
            break
        # capped sites get exactly cap * total; the rest keep their proportions of what is left
        scale = (1 - cap * len(capped)) * total / free_sum
        new = [cap * total if i in capped else w[i] * scale for i in range(len(w))]
        if all(x <= cap * total + 1e-9 for x in new):
            return new
        w = new
    return w


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - reference`` over the keys of ``arrays``."""
    total = 0.0
    for key, arr in arrays.items():
        total += float(np.square(arr.numpy().astype(np.float64) - reference[key]).sum())
    return float(np.sqrt(total))


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
        self._global = {
            k: a.numpy().astype(np.float64) for k, a in arrays.items()
        }  # deserialized once per round
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
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Triage every reply, then aggregate the accepted updates with the inner strategy."""
        parsed = [parse_train(m) for m in replies]
        for p in parsed:
            if p.row.site.startswith("node-"):
                p.row.site = self.registry.name_of(p.row.node_id) or p.row.site
        parsed.sort(key=lambda p: (p.row.site, p.row.node_id))  # a fixed summation order
        accepted: list[TrainReply] = []
        for p in parsed:
            row = p.row
            if row.status in ("trained", "refused"):
                problem = self._check(p)
                if problem:
                    row.reject(problem)
                else:
                    self.registry.record(row)
                    if row.status == "trained":
                        accepted.append(p)
        accepted = self._outliers(accepted)
        self.rows = [p.row for p in parsed]
        for row in self.rows:
            if row.status != "trained":
                log.warning("round %d: site %s %s: %s", server_round, row.site, row.status, row.reason)
        if not accepted:
            return None, None
        weights = [1.0 if self.equal_weights else self._weight(p.row) for p in accepted]
        if not self.equal_weights:
            weights = capped_weights(weights, self.rules.max_weight_share)
        clean = [
            Message(
                RecordDict({"arrays": p.arrays, "metrics": MetricRecord({WEIGHT: w})}),
                dst_node_id=p.row.node_id,
                message_type="train",
            )
            for p, w in zip(accepted, weights, strict=True)
            if p.arrays is not None
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
        problems = check_update(p.arrays, rules.template)
        n = row.metrics["num-examples"]
        if not 0 < n <= rules.max_num_examples:
            problems.append(f"num-examples {n:g} is not a count in (0, {rules.max_num_examples}]")
        if problems:
            return "; ".join(problems)
        if row.receipt.get("update_sha256") != update_sha256(p.arrays):
            return "the update does not match the ledger receipt sent with it"
        p.arrays = to_float32(p.arrays)  # norms and aggregation in float32, whatever the wire precision
        if rules.max_update_norm > 0 and self._global:
            norm = update_norm(p.arrays, self._global)
            row.metrics["update-norm"] = norm
            if norm > rules.max_update_norm:
                return f"update norm {norm:.4g} exceeds the bound max-update-norm={rules.max_update_norm:g}"
        return ""

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
        norms = []
        for p in accepted:
            if "update-norm" not in p.row.metrics and p.arrays is not None:
                p.row.metrics["update-norm"] = update_norm(p.arrays, self._global)
            norms.append(p.row.metrics["update-norm"])
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


@dataclass(frozen=True)
class SiteLevelDP:
    """Site-level DP at the coordinator: each site's update clipped, Gaussian noise on the sum."""

    noise_multiplier: float
    clipping_norm: float
    delta: float


def build_strategy(
    *,
    min_sites: int,
    fraction_train: float,
    sites_expected: int,
    site_dp: SiteLevelDP | None,
    aggregation: str = "fedavg",
    trim_beta: float = 0.2,
) -> tuple[Strategy, DifferentialPrivacyServerSideFixedClipping | None]:
    """Flower's FedAvg (or its robust median / trimmed-mean / Krum), optionally with site-level DP.

    The inner strategy aggregates by the ``weight`` the :class:`Guard` gives each update (equal weights
    under site-level DP: with num-examples weights one site's influence would depend on its size).
    Flower's DP accountant requires FedAvg's own aggregation, so site-level DP combines with ``fedavg`` only.
    """
    common: dict[str, Any] = {
        "fraction_train": fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
        "weighted_by_key": WEIGHT,
    }
    robust: dict[str, Callable[[], FedAvg]] = {
        "median": lambda: FedMedian(**common),
        "trimmed-mean": lambda: FedTrimmedAvg(beta=trim_beta, **common),
        "krum": lambda: Krum(num_malicious_nodes=max(0, (sites_expected - 3) // 2), **common),
    }
    if aggregation not in AGGREGATIONS:
        raise ConfigError("run config", [f"'aggregation' must be one of {', '.join(AGGREGATIONS)}"])
    if aggregation != "fedavg":
        if site_dp is not None:
            raise ConfigError(
                "run config",
                [
                    "site-level DP ('site-dp-noise' > 0) needs 'aggregation' = 'fedavg': Flower's DP "
                    "accountant covers FedAvg's own aggregation only"
                ],
            )
        return robust[aggregation](), None
    fedavg = FedAvg(**common)
    if site_dp is None:
        return fedavg, None
    config = PrivacyConfig(
        target_delta=site_dp.delta,
        population_size=sites_expected,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        fedavg,
        noise_multiplier=site_dp.noise_multiplier,
        clipping_norm=site_dp.clipping_norm,
        num_sampled_clients=sites_expected,
        accountant=RdpAccountant(config),
    )
    return wrapper, wrapper
