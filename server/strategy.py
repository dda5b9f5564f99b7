"""Reply triage in front of Flower's strategies, and the strategy a run uses.

Replies are sorted into trained, refused, failed and rejected. Only well-formed updates
(exact adapter keys, shapes, dtypes, finite values, matching the site's ledger receipt)
reach the Flower strategy; everything else is logged with the site and the reason and
the round goes on without it. Triage runs before any wrapper (e.g. site-level DP
clipping), so a receipt is checked against the bytes the site actually sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from common.arrays import ArraySpec, check_update, payload_bytes, update_sha256
from common.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SiteReply:
    """What one site answered in one phase of one round."""

    node_id: int
    site: str
    status: str  # trained | refused | failed | rejected | evaluated
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    scrub: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    receipt: dict[str, Any] = field(default_factory=dict)


def describe(msg: Message) -> SiteReply:
    """Turn one reply into a ``SiteReply`` (no validation of arrays)."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        reason = msg.error.reason or f"error code {msg.error.code}"
        return SiteReply(node, f"node-{node}", "failed", reason)  # named from earlier rounds in triage
    content = msg.content
    site = content.config_records.get("site")
    name = str(site.get("name", f"node-{node}")) if site else f"node-{node}"
    status = str(site.get("status", "evaluated")) if site else "evaluated"
    reason = str(site.get("reason", "")) if site else ""
    metrics = {
        k: float(v)
        for rec in content.metric_records.values()
        for k, v in rec.items()
        if isinstance(v, (int, float))
    }
    scrub_rec = content.config_records.get("scrub")
    scrub = {k: int(v) for k, v in scrub_rec.items() if isinstance(v, int)} if scrub_rec else {}
    up = sum(payload_bytes(r) for r in content.array_records.values())
    receipt_rec = content.config_records.get("receipt")
    receipt = dict(receipt_rec.items()) if receipt_rec else {}
    return SiteReply(node, name, status, reason, metrics, scrub, up, receipt)


@dataclass(frozen=True)
class UpdateRules:
    """What an acceptable update of one round looks like."""

    template: dict[str, ArraySpec]
    server_round: int
    run_id: str
    global_arrays: ArrayRecord | None = None  # the adapter the sites started from (for the norm bound)
    max_update_norm: float = 0.0  # L2 bound on (update - global); 0 = off
    update_norm_ratio: float = 0.0  # bound relative to the round's median update norm; 0 = off
    max_num_examples: int = 100_000_000


def triage_train(
    server_round: int, replies: Iterable[Message], rules: UpdateRules, names: Mapping[str, str] | None = None
) -> tuple[list[Message], list[SiteReply]]:
    """Sort training replies; return the acceptable ones and what every site answered.

    ``names`` maps node ids to site names seen in earlier rounds (a crashed site's error
    reply may not carry its name).
    """
    accepted: list[tuple[Message, SiteReply]] = []
    infos: list[SiteReply] = []
    described = [(m, describe(m)) for m in replies]
    for _, info in described:
        if info.site.startswith("node-") and names:
            info.site = names.get(str(info.node_id), info.site)
    # sorted by site, so aggregation sums in the same order whatever order replies arrive in
    for msg, info in sorted(described, key=lambda p: (p[1].site, p[1].node_id)):
        if info.status == "trained":
            problems = check_reply(msg.content.array_records.get("arrays"), info, rules)
            if problems:
                info.status, info.reason = "rejected", "; ".join(problems)
            else:
                accepted.append((msg, info))
        elif info.status not in ("refused", "failed"):
            info.status, info.reason = "rejected", f"unknown status '{info.status}'"
        infos.append(info)
    accepted = _outliers_rejected(accepted, rules)
    for info in infos:
        if info.status != "trained":
            log.warning("round %d: site %s %s: %s", server_round, info.site, info.status, info.reason)
    rejected = sum(i.status == "rejected" for i in infos)
    if rejected:
        log.warning("round %d: %d update(s) rejected", server_round, rejected)
    if not accepted:
        log.warning("round %d: no site update accepted; the global adapter is unchanged", server_round)
    return [m for m, _ in accepted], infos


def _outliers_rejected(
    accepted: list[tuple[Message, SiteReply]], rules: UpdateRules
) -> list[tuple[Message, SiteReply]]:
    """Reject updates whose norm is over ``update_norm_ratio`` x the round's median (3+ updates)."""
    if rules.update_norm_ratio <= 0 or rules.global_arrays is None or len(accepted) < 3:
        return accepted
    norms = [update_norm(m.content.array_records["arrays"], rules.global_arrays) for m, _ in accepted]
    bound = rules.update_norm_ratio * float(np.median(norms))
    kept = []
    for (msg, info), norm in zip(accepted, norms, strict=True):
        if norm > bound:
            info.status = "rejected"
            info.reason = (
                f"update norm {norm:.4g} is over update-norm-ratio={rules.update_norm_ratio:g} x the "
                f"round's median update norm ({bound:.4g})"
            )
        else:
            kept.append((msg, info))
    return kept


def check_reply(arrays: ArrayRecord | None, info: SiteReply, rules: UpdateRules) -> list[str]:
    """Why an update cannot be aggregated (empty list = accept)."""
    if arrays is None:
        return ["no 'arrays' record"]
    problems = check_update(arrays, rules.template)
    n = info.metrics.get("num-examples", 0.0)
    if not 0 < n <= rules.max_num_examples or n != int(n):
        problems.append(f"num-examples {n:g} is not a count in (0, {rules.max_num_examples}]")
    if problems:
        return problems
    if info.receipt.get("update_sha256") != update_sha256(arrays):
        problems.append("the update does not match the ledger receipt sent with it")
    if "hash" in info.receipt and (info.receipt.get("round"), info.receipt.get("run_id")) != (
        rules.server_round,
        rules.run_id,
    ):
        problems.append(
            f"the receipt is for run {info.receipt.get('run_id')!r} round {info.receipt.get('round')}, "
            f"not this round ({rules.run_id!r} round {rules.server_round}): a replayed update"
        )
    if rules.max_update_norm > 0 and rules.global_arrays is not None:
        norm = update_norm(arrays, rules.global_arrays)
        if norm > rules.max_update_norm:
            problems.append(
                f"update norm {norm:.4g} exceeds the bound max-update-norm={rules.max_update_norm:g}"
            )
    return problems


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over the keys of ``arrays``."""
    total = 0.0
    for key, arr in arrays.items():
        diff = arr.numpy().astype(np.float64) - reference[key].numpy().astype(np.float64)
        total += float(np.square(diff).sum())
    return float(np.sqrt(total))


def triage_evaluate(server_round: int, replies: Iterable[Message]) -> tuple[list[Message], list[SiteReply]]:
    """Sort evaluation replies; failed sites are logged and left out."""
    ok: list[Message] = []
    infos: list[SiteReply] = []
    for msg in replies:
        info = describe(msg)
        infos.append(info)
        if info.status == "failed":
            log.warning("round %d: site %s evaluation failed: %s", server_round, info.site, info.reason)
        else:
            ok.append(msg)
    return ok, infos


@dataclass(frozen=True)
class SiteLevelDP:
    """Site-level DP at the coordinator: each site's update clipped, Gaussian noise on the sum."""

    noise_multiplier: float
    clipping_norm: float
    delta: float


AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")


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

    Site-level DP weights every site equally (``site-weight``, sent as 1 by every site): with
    num-examples weights one site's influence would depend on its size. Flower's DP accountant
    requires FedAvg's own aggregation, so site-level DP combines with ``fedavg`` only.
    """
    common: dict[str, Any] = {
        "fraction_train": fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
        "weighted_by_key": "num-examples" if site_dp is None else "site-weight",
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
