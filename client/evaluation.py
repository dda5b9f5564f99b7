"""Held-out evaluation at a site: a fixed, bounded sample, scored once per adapter.

**Bounded.** ``[evaluation] max-records`` caps the held-out records scored per evaluation. The sample
is fixed: the records whose content hashes (salted, so the sample does not follow the train/held-out
split's own hash) are smallest, the same records every round, so losses stay comparable across rounds.
Its sampling error is reported as ``eval-loss-stderr`` (with the finite-population correction: 0 when
every record is scored) beside ``eval-records``, the records scored.

**Once per adapter.** The global adapter a site evaluates after aggregation is the one the next
round's train request brings, so the site scores it once: results are cached in the state dir
(``eval-cache.json``, atomic writes, bounded, a corrupt file counts as absent), so the cache survives the
fresh process the Deployment Engine starts per message. The key is a digest the site computes over what
it received (the adapter's bytes) and over everything else the result depends on (kind, dpo-beta,
LoRA layout, base model, compute, the scored token rows); the value is what the site computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.tokens import Tokenized, take_records
from common.config import TrainRequest
from common.declare import Rule, flatten, option
from common.fsutil import atomic_write_text

if TYPE_CHECKING:
    import torch

    from client.compute import Compute

__all__ = ["CACHE_ENTRIES", "EvalCache", "EvaluationSection", "HeldSample", "ratio_stderr", "sample_held"]

log = logging.getLogger(__name__)
CACHE_ENTRIES = 256  # results kept in the state dir (each one a few hundred bytes)
EVAL_VERSION = 1  # bump when what a held-out metric means changes (old cache entries then never match)
_SALT = b"fedtune held-out sample\0"
SAMPLING_KEYS = ("eval-records", "eval-loss-stderr")
_REQUIRED = {"eval-loss", *SAMPLING_KEYS}  # what every scored entry holds


@dataclass(frozen=True)
class EvaluationSection:
    """``[evaluation]``: how much of the held-out split a round scores, and what the reply says of it."""

    max_records: int = option(
        "max-records",
        256,
        "held-out records scored per evaluation: a fixed sample (the same records every round), so a "
        "round's evaluation costs about what its training does; 0 = every held-out record",
        Rule("0 (all) or an integer >= 2", lambda v: v == 0 or v >= 2),
    )
    allow_full_on_request: bool = option(
        "allow-full-on-request",
        False,
        "score every held-out record when the coordinator's evaluate message asks (eval-full = true); "
        "otherwise max-records holds whatever the coordinator asks",
        Rule("true or false"),
    )
    report_sampling: bool = option(
        "report-sampling",
        True,
        "add eval-records and eval-loss-stderr (train replies: the same, suffixed -before) to the "
        "replies (false: the loss alone; the error tells the spread of held-out losses)",
        Rule("true or false"),
    )


@dataclass(frozen=True)
class HeldSample:
    """The held-out rows scored: ``records`` of ``population`` held-out records, and their digest."""

    ids: torch.Tensor
    roles: torch.Tensor
    group: torch.Tensor
    records: int
    population: int
    digest: str  # SHA-256 of the scored token rows (tokenizer, max-seq-len, selection all in it)


def sample_held(held: Tokenized, texts: Sequence[str], limit: int) -> HeldSample:
    """The ``limit`` held-out records (0: all) whose salted content hashes are smallest.

    ``texts`` are the held-out examples' texts in order; those left out for length (``held.too_long``)
    are skipped, so record ``r`` of ``held`` is the ``r``-th text that fits.
    """
    import torch

    left_out = set(held.too_long)
    kept = [t for i, t in enumerate(texts) if i not in left_out]
    if len(kept) != held.records:
        raise ValueError(f"{len(kept)} held-out texts fit but the token rows hold {held.records} records")
    ids, roles, group = held.ids, held.roles, held.group
    if 0 < limit < held.records:
        ranked = sorted(range(len(kept)), key=lambda r: hashlib.sha256(_SALT + kept[r].encode()).digest())
        ids, roles, group = take_records(ids, roles, group, torch.tensor(ranked[:limit], dtype=torch.long))
    digest = hashlib.sha256(f"{held.records}|{tuple(ids.shape)}|".encode())
    for t in (ids, roles, group):
        digest.update(t.contiguous().numpy().tobytes())
    records = int(group.max()) + 1 if group.numel() else 0
    return HeldSample(ids, roles, group, records, held.records, digest.hexdigest())


def _fpc(sample: int, population: int) -> float:
    """The finite-population correction ``1 - n / N`` (0 when every record is scored)."""
    return max(0.0, 1.0 - sample / population) if population else 0.0


def ratio_stderr(values: torch.Tensor, weights: torch.Tensor, population: int) -> float:
    """Standard error of ``sum(values) / sum(weights)`` over a simple random sample of records.

    The ratio estimator's linearization: residuals ``v - R w`` around the sample ratio ``R``, their
    variance over ``n - 1``, times ``1 - n / N``, over ``n * mean(w) ** 2``. With equal weights this
    is the standard error of a plain mean.
    """
    n = values.numel()
    if n < 2 or float(weights.sum()) <= 0:
        return 0.0
    v, w = values.double(), weights.double()
    ratio = float(v.sum() / w.sum())
    residual = v - ratio * w
    var = float((residual**2).sum()) / (n - 1)
    return math.sqrt(_fpc(n, population) * var / n) / float(w.mean())


class EvalCache:
    """Held-out metrics per evaluation key, in one JSON file (the ``CACHE_ENTRIES`` newest kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("held-out cache %s is unreadable (%s): ignored, it is rebuilt", self.path, exc)
            return {}
        entries = raw.get("entries") if isinstance(raw, dict) and raw.get("version") == EVAL_VERSION else None
        if not isinstance(entries, dict):
            return {}
        return {
            k: {str(m): float(x) for m, x in v.items()}
            for k, v in entries.items()
            if isinstance(v, dict)
            and set(v) >= _REQUIRED
            and all(isinstance(x, int | float) for x in v.values())
        }

    def get(self, key: str) -> dict[str, float] | None:
        """The metrics stored under ``key``, if any."""
        return self._read().get(key)

    def put(self, key: str, metrics: dict[str, float]) -> None:
        """Store ``metrics`` under ``key`` (oldest entries dropped); a failed write only logs."""
        entries = self._read()
        entries.pop(key, None)
        entries[key] = metrics
        kept = dict(list(entries.items())[-CACHE_ENTRIES:])
        try:
            atomic_write_text(self.path, json.dumps({"version": EVAL_VERSION, "entries": kept}))
        except OSError as exc:
            log.warning("held-out cache %s not written (%s): the next request scores again", self.path, exc)


def eval_key(adapter: str, sample: HeldSample, req: TrainRequest, base: str, compute: Compute) -> str:
    """The cache key: the adapter received (its digest), the rows scored, and what else the result
    depends on: kind, dpo-beta, max-seq-len, the LoRA layout, the base model and the compute plan."""
    kind = req.train.train_kind
    body = {"v": EVAL_VERSION, "adapter": adapter, "rows": sample.digest, "kind": kind, "base": base,
            "dpo-beta": req.train.dpo_beta if kind == "dpo" else None, "max-seq-len": req.train.max_seq_len,
            "lora": flatten(req.lora), "compute": compute.describe()}  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cached(cache: EvalCache, key: str, score: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``score()``'s metrics, computed only if ``key`` is not in ``cache`` yet."""
    hit = cache.get(key)
    if hit is not None:
        return hit
    metrics = score()
    cache.put(key, metrics)
    return metrics


def reported(metrics: dict[str, float], section: EvaluationSection) -> dict[str, float]:
    """The held-out metrics a reply carries: the sampling keys only if the policy reports them."""
    return {k: v for k, v in metrics.items() if section.report_sampling or k not in SAMPLING_KEYS}


def full_requested(request: Any, section: EvaluationSection, site: str) -> tuple[Any, bool]:
    """``(request without eval-full, whether to score every record)``: the policy has the last word."""
    if not isinstance(request, dict) or "eval-full" not in request:
        return request, False
    rest = {k: v for k, v in request.items() if k != "eval-full"}
    asked = request["eval-full"] is True
    if asked and not section.allow_full_on_request:
        log.info("site %s scores its max-records sample: allow-full-on-request is off", site)
    return rest, asked and section.allow_full_on_request
