"""Every site reply, validated into a typed form before anything else looks at it.

A site is not trusted: its reply may carry any records, keys and values. :func:`parse_train` and
:func:`parse_evaluate` accept exactly the layout the ClientApp sends (``client/client_app.py``) -- the
records, the metric keys, their types and ranges, a bounded receipt -- and turn anything else into a
row with status ``rejected`` and the reason. Nothing here raises for content.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message

from common.arrays import payload_bytes
from common.config import SITE_NAME
from common.sections import TRAIN_KINDS
from privacy.ledger_checks import parse_json

__all__ = ["EvalReply", "SiteReply", "TrainReply", "parse_evaluate", "parse_train"]

MAX_TEXT = 2000  # characters of a site's reason kept
MAX_RECEIPT = 65536  # bytes of a receipt entry
# metric keys of a train reply: required for every status, then per status, then optional
_METRICS_ALWAYS = frozenset({"num-examples", "delta", "max-epsilon", "private"})
_METRICS_TRAINED = frozenset(
    {"eval-loss-before", "train-batches", "noise-multiplier", "sample-rate", "steps"}
)
_METRICS_OPTIONAL = frozenset(
    {
        "epsilon",
        "epsilon-rdp",
        "train-loss",
        "records-too-long",
        "reward-margin-before",
        "reward-accuracy-before",
        "eval-records-before",
        "eval-loss-stderr-before",
    }
)
_EVAL_REWARDS = ("reward-margin", "reward-accuracy")  # held-out, of a dpo run's global adapter
_EVAL_SAMPLING = ("eval-records", "eval-loss-stderr")  # the bounded held-out sample and its error
_SITE_KEYS = frozenset({"name", "status", "reason", "key", "train-kind"})


@dataclass
class SiteReply:
    """What one site answered in one phase of one round (the row logged and summarised)."""

    node_id: int
    site: str
    status: str  # trained | refused | failed | rejected | evaluated
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    scrub: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    receipt: dict[str, Any] = field(default_factory=dict)  # the ledger entry the site answered with
    public_key: str = ""
    train_kind: str = "sft"  # what the site says it trained (absent from older sites: sft)

    def reject(self, reason: str) -> None:
        """Mark the reply rejected (it is logged and left out of the round)."""
        self.status, self.reason = "rejected", reason


@dataclass
class TrainReply:
    """A well-formed train reply: the row, plus the update when the site trained."""

    row: SiteReply
    arrays: ArrayRecord | None = None


@dataclass
class EvalReply:
    """A well-formed evaluate reply."""

    row: SiteReply
    loss: float = math.nan
    num_examples: int = 0


def _text(value: object, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _records(msg: Message, arrays: frozenset[str], metrics: frozenset[str], configs: frozenset[str]) -> str:
    """Why the reply's records are not exactly the expected ones ('' when they are)."""
    content = msg.content
    problems = []
    for kind, got, allowed in (
        ("array", set(content.array_records), arrays),
        ("metric", set(content.metric_records), metrics),
        ("config", set(content.config_records), configs),
    ):
        extra = sorted(got - allowed)
        if extra:
            problems.append(f"unexpected {kind} record(s) {[_text(k, 40) for k in extra[:3]]}")
    missing = sorted((metrics | {"site"}) - set(content.metric_records) - set(content.config_records))
    if missing:
        problems.append(f"missing record(s) {missing}")
    return "; ".join(problems)


def _name(msg: Message, row: SiteReply) -> None:
    """The site's name, if its reply states a valid one (to name it in the log even when rejected)."""
    site = msg.content.config_records.get("site")
    name = site.get("name") if site is not None else None
    if isinstance(name, str) and SITE_NAME.fullmatch(name):
        row.site = name


def _site(msg: Message, row: SiteReply, statuses: tuple[str, ...]) -> str:
    """Fill the row from the ``site`` record; why it is malformed ('' when fine)."""
    site = msg.content.config_records["site"]
    extra = sorted(set(site) - _SITE_KEYS)
    name, status = site.get("name"), site.get("status")
    if extra:
        return f"unexpected keys {[_text(k, 40) for k in extra[:3]]} in the 'site' record"
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        return f"site name {_text(repr(name), 80)} is not 1-64 letters, digits, '-' or '_'"
    row.site = name
    if status not in statuses:
        return f"unknown status {_text(repr(status), 40)} (expected {' or '.join(statuses)})"
    row.status = str(status)
    row.reason = _text(site.get("reason", ""))
    key = site.get("key", "")
    if not isinstance(key, str) or len(key) > 1000:
        return "the 'key' in the 'site' record is not a PEM public key"
    row.public_key = key
    kind = site.get("train-kind", "sft")
    if kind not in TRAIN_KINDS:
        return f"unknown train-kind {_text(repr(kind), 40)} in the 'site' record"
    row.train_kind = str(kind)
    return ""


def _metrics(msg: Message, row: SiteReply, required: frozenset[str], optional: frozenset[str]) -> str:
    record = msg.content.metric_records["metrics"]
    keys = set(record)
    if keys - required - optional:
        return f"unexpected metric keys {sorted(_text(k, 40) for k in keys - required - optional)[:5]}"
    if required - keys:
        return f"missing metric keys {sorted(required - keys)}"
    bad = sorted(k for k, v in record.items() if not _number(v))
    if bad:
        return f"metrics {bad[:5]} are not finite numbers"
    row.metrics = {k: float(v) for k, v in record.items()}  # type: ignore[arg-type]  # checked numbers above
    n = row.metrics["num-examples"]
    if n != int(n) or n < 0 or n > 1e12:
        return f"num-examples {n:g} is not a count"
    if row.metrics.get("private") not in (0.0, 1.0):
        return "metric 'private' must be 0 or 1"
    if row.metrics["private"] == 1.0 and "epsilon" not in keys:
        return "a private site must report its epsilon"
    return ""


def _scrub(msg: Message, row: SiteReply) -> str:
    record = msg.content.config_records.get("scrub")
    if record is None:
        return ""
    if len(record) > 64 or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in record.items()
    ):
        return "the 'scrub' record must map at most 64 entity types to counts"
    row.scrub = {str(k): v for k, v in record.items() if isinstance(v, int)}
    return ""


def _receipt(msg: Message, row: SiteReply) -> str:
    record = msg.content.config_records.get("receipt")
    if record is None:
        return ""
    entry = record.get("entry")
    if set(record) != {"entry"} or not isinstance(entry, str) or len(entry) > MAX_RECEIPT:
        return "the 'receipt' record must hold one ledger entry as JSON under 'entry'"
    raw, problem = parse_json(entry)
    if raw is None:
        return f"the receipt is not a ledger entry ({problem})"
    row.receipt = raw
    return ""


def parse_train(msg: Message, *, legacy: bool = False) -> TrainReply:
    """A train reply as a typed form; a malformed one comes back with its row ``rejected``.

    ``legacy``: a SecAgg+ collect-stage reply, whose masked update travels in Flower's legacy records
    (read by the protocol, not here); only the fedtune records are checked.
    """
    node = msg.metadata.src_node_id
    row = SiteReply(node, f"node-{node}", "failed")
    if msg.has_error():
        row.reason = _text(msg.error.reason or f"error code {msg.error.code}")
        return TrainReply(row)
    content = msg.content
    row.bytes_up = sum(payload_bytes(r) for r in content.array_records.values())
    _name(msg, row)
    if legacy:
        problem = (
            ""
            if {"metrics"} <= set(content.metric_records) and "site" in content.config_records
            else "missing record(s)"
        )
    else:
        problem = _records(
            msg, frozenset({"arrays"}), frozenset({"metrics"}), frozenset({"site", "scrub", "receipt"})
        )
    problem = problem or _site(msg, row, ("trained", "refused"))
    trained = row.status == "trained"
    if not problem:
        required = _METRICS_ALWAYS | (_METRICS_TRAINED if trained else frozenset())
        optional = _METRICS_OPTIONAL if trained else frozenset({"epsilon"})
        problem = _metrics(msg, row, required, optional) or _scrub(msg, row) or _receipt(msg, row)
    arrays = None if legacy else content.array_records.get("arrays")
    if not problem and trained and arrays is None and not legacy:
        problem = "a trained reply without its 'arrays' record"
    if not problem and not trained and arrays is not None:
        problem = "a refusal must not carry arrays"
    if problem:
        row.reject(problem)
        return TrainReply(row)
    return TrainReply(row, arrays if trained else None)


def parse_evaluate(msg: Message) -> EvalReply:
    """An evaluate reply as a typed form; a malformed one comes back with its row ``rejected``."""
    node = msg.metadata.src_node_id
    row = SiteReply(node, f"node-{node}", "failed")
    if msg.has_error():
        row.reason = _text(msg.error.reason or f"error code {msg.error.code}")
        return EvalReply(row)
    _name(msg, row)
    problem = _records(msg, frozenset(), frozenset({"metrics"}), frozenset({"site"}))
    problem = problem or _site(msg, row, ("evaluated",))
    problem = problem or _eval_metrics(msg, row)
    if problem:
        row.reject(problem)
        return EvalReply(row)
    return EvalReply(row, row.metrics["eval-loss"], int(row.metrics["num-examples"]))


def _eval_metrics(msg: Message, row: SiteReply) -> str:
    record: Mapping[str, Any] = msg.content.metric_records["metrics"]
    keys = set(record)
    if (
        not {"eval-loss", "num-examples"}
        <= keys
        <= {"eval-loss", "num-examples", *_EVAL_REWARDS, *_EVAL_SAMPLING}
    ):
        got = sorted(_text(k, 40) for k in record)[:5]
        want = f"eval-loss and num-examples (optional: {', '.join(_EVAL_SAMPLING + _EVAL_REWARDS)})"
        return f"evaluate metrics must be {want}, got {got}"
    if not all(_number(v) for v in record.values()):
        return "evaluate metrics are not finite numbers"
    loss, n = float(record["eval-loss"]), float(record["num-examples"])
    if loss < 0 or n != int(n) or not 0 < n <= 1e12:
        return f"eval-loss {loss:g} / num-examples {n:g} out of range"
    if not 0 <= float(record.get("reward-accuracy", 0.0)) <= 1:
        return "reward-accuracy must be a share in [0, 1]"
    scored = float(record.get("eval-records", 1.0))
    if scored != int(scored) or not 0 < scored <= 1e12 or float(record.get("eval-loss-stderr", 0.0)) < 0:
        return "eval-records must be a positive count and eval-loss-stderr not negative"
    row.metrics = {k: float(v) for k, v in record.items()}
    return ""
