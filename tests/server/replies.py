"""Site replies as the real ClientApp lays them out, for triage tests without a site."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Error, Message, RecordDict

from client.client_app import reply_records
from client.outcome import RoundOutcome
from common.arrays import ArraySpec, spec_of, to_record, update_sha256
from privacy.ledger_entries import GENESIS_HASH, canonical_bytes, entry_hash
from server.registry import SiteRegistry
from server.strategy import Guard, UpdateRules, build_strategy

TEMPLATE = {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
RUN = "r"


def ask(node: int) -> Message:
    """A train instruction to ``node``."""
    return Message(RecordDict(), dst_node_id=node, message_type="train")


def error_reply(node: int, reason: str) -> Message:
    """What Flower returns for a site that crashed."""
    return Message(Error(code=4001, reason=reason), reply_to=ask(node))


def receipt(
    kind: str, rnd: int, seq: int = 1, sign: Callable[[bytes], str] | None = None, **fields: Any
) -> dict[str, Any]:
    """A ledger entry as a site writes it (hash over its canonical bytes; signed if ``sign``)."""
    body: dict[str, Any] = {
        "kind": kind,
        "round": rnd,
        "run_id": RUN,
        "seq": seq,
        "time": "2026-12-01T00:00:00+00:00",
    }
    body |= {"prev_hash": GENESIS_HASH} | fields
    if kind == "commit":
        body.setdefault("reserve_seq", seq - 1)
        body.setdefault("num_examples", 10)
        body.setdefault("metrics", {})
    if kind == "refuse":
        body.setdefault("reason", "refused")
    body["hash"] = entry_hash(body)
    if sign is not None:
        body["signature"] = sign(canonical_bytes(body))
    return body


def trained(
    node: int,
    value: float = 0.1,
    *,
    n: int = 10,
    rnd: int = 1,
    arrays: ArrayRecord | None = None,
    receipt_of: ArrayRecord | None = None,
    site: str | None = None,
    epsilon: float = 1.0,
    seq: int = 1,
    key: str = "",
    sign: Callable[[bytes], str] | None = None,
) -> Message:
    """A trained site's reply: ``value`` in every adapter entry, a matching signed receipt."""
    arrays = (
        arrays
        if arrays is not None
        else to_record({k: torch.full_like(v, value) for k, v in TEMPLATE.items()})
    )
    digest = update_sha256(receipt_of if receipt_of is not None else arrays)
    metrics = {"eval-loss-before": 5.0, "train-batches": 3.0, "noise-multiplier": 1.0, "sample-rate": 0.1}
    metrics |= {"steps": 3.0, "train-loss": 4.0, "epsilon": epsilon, "epsilon-rdp": epsilon * 1.1}
    metrics |= {"delta": 1e-5, "max-epsilon": 8.0, "private": 1.0}
    out = RoundOutcome(
        site=site or f"s{node}",
        trained=True,
        arrays=arrays,
        num_examples=n,
        metrics=metrics,
        scrub_counts={"PERSON": 2},
        receipt=receipt("commit", rnd, seq, sign, update_sha256=digest),
        public_key=key,
    )
    content = reply_records(out)
    content["arrays"] = arrays
    return Message(content, reply_to=ask(node))


def refused(
    node: int, *, rnd: int = 1, reason: str = "privacy budget exhausted", epsilon: float = 7.9
) -> Message:
    """A refusing site's reply, with its refuse entry as the receipt."""
    out = RoundOutcome(
        site=f"s{node}",
        trained=False,
        reason=reason,
        metrics={"delta": 1e-5, "max-epsilon": 8.0, "private": 1.0, "epsilon": epsilon},
        receipt=receipt("refuse", rnd, reason=reason),
    )
    return Message(reply_records(out), reply_to=ask(node))


def edit(msg: Message, change: Callable[[RecordDict], None]) -> Message:
    """``msg`` with its content changed by ``change`` (a hostile site's reply)."""
    change(msg.content)
    return msg


def guard(
    *,
    aggregation: str = "fedavg",
    site_dp: Any = None,
    sites: int = 3,
    registry: SiteRegistry | None = None,
    wire: str = "float32",
    **rules: Any,
) -> Guard:
    """A triage wrapper over Flower's strategy, as the coordinator builds it, before round 1.

    ``wire`` is the run's ``wire-dtype``: the precision the updates must arrive in.
    """
    inner, _ = build_strategy(
        min_sites=1, fraction_train=1.0, sites_expected=sites, site_dp=site_dp, aggregation=aggregation
    )
    g = Guard(
        inner,
        UpdateRules(
            {k: ArraySpec(v.shape, wire) for k, v in spec_of(to_record(TEMPLATE)).items()},
            RUN,
            **({"max_weight_share": 1.0} | rules),
        ),
        registry or SiteRegistry(None, {}, {}),
        equal_weights=site_dp is not None,
    )
    g._round = 1
    g._connected = set(range(1, 64))
    g._global = {k: v.numpy().astype("float64") for k, v in TEMPLATE.items()}
    return g


def rows(g: Guard) -> Mapping[str, tuple[str, str]]:
    """Site -> (status, reason) of the last phase."""
    return {r.site: (r.status, r.reason) for r in g.rows}
