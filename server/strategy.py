"""FedAvg that knows sites: it sorts replies into trained, refused, failed and rejected.

Only well-formed updates (exact adapter keys, shapes, dtypes, finite values) reach
Flower's weighted averaging; everything else is logged with the site and the reason
and the round goes on without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from common.arrays import ArraySpec, check_update, payload_bytes, update_sha256

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
        return SiteReply(node, f"node-{node}", "failed", reason)
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


class SiteFedAvg(FedAvg):
    """Flower's FedAvg with per-site reply triage in front of aggregation."""

    def __init__(self, template: dict[str, ArraySpec], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.template = template
        self.last_train: list[SiteReply] = []
        self.last_evaluate: list[SiteReply] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Triage replies, then FedAvg the accepted updates."""
        accepted: list[Message] = []
        self.last_train = []
        for msg in replies:
            info = describe(msg)
            if info.status == "trained":
                problems = self._check(msg.content.array_records.get("arrays"), info)
                if problems:
                    info.status, info.reason = "rejected", "; ".join(problems)
                else:
                    accepted.append(msg)
            elif info.status == "refused":
                pass
            elif info.status != "failed":
                info.status, info.reason = "rejected", f"unknown status '{info.status}'"
            if info.status != "trained":
                log.warning("round %d: site %s %s: %s", server_round, info.site, info.status, info.reason)
            self.last_train.append(info)
        if not accepted:
            log.warning("round %d: no site update accepted; the global adapter is unchanged", server_round)
            return None, None
        return super().aggregate_train(server_round, accepted)

    def _check(self, arrays: ArrayRecord | None, info: SiteReply) -> list[str]:
        """Why an update cannot be aggregated (empty list = accept)."""
        if arrays is None:
            return ["no 'arrays' record"]
        problems = check_update(arrays, self.template)
        if not problems and info.receipt.get("update_sha256") != update_sha256(arrays):
            problems.append("the update does not match the ledger receipt sent with it")
        return problems

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record per-site held-out losses, then aggregate the successful ones."""
        ok: list[Message] = []
        self.last_evaluate = []
        for msg in replies:
            info = describe(msg)
            self.last_evaluate.append(info)
            if info.status == "failed":
                log.warning("round %d: site %s evaluation failed: %s", server_round, info.site, info.reason)
            else:
                ok.append(msg)
        return super().aggregate_evaluate(server_round, ok) if ok else None
