"""A site's records of every training kind: validated, scrubbed and tokenized once per process.

The site agent (``client.site``) asks for a kind's records and for its token rows at a request's
``max-seq-len``; both are cached, so a warm site worker never re-reads, re-scrubs or re-tokenizes.
What the kind trains on and how it is evaluated is here too: the kind picks the loss
(``client.objectives``) and the held-out metrics; the budget gate and the ledger do not care.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from client.data import SiteData, load_site_data
from client.evaluation import HeldSample, ratio_stderr, sample_held
from client.objectives import DPO, Objective, pair_margins, record_nll, token_mean
from client.policy import SitePolicy
from client.tokens import Tokenized, tokenize_examples
from common.config import TrainConfig
from common.errors import PolicyViolationError

__all__ = ["SiteRecords", "held_out", "objective_for"]

log = logging.getLogger(__name__)


def objective_for(train: TrainConfig) -> Objective:
    """The per-record loss of the request's kind."""
    return DPO(train.dpo_beta) if train.train_kind == "dpo" else token_mean


def held_out(train: TrainConfig, model: Any, sample: HeldSample) -> dict[str, float]:
    """The kind's held-out metrics on ``sample``: ``eval-loss`` (dpo: the DPO loss, reward margin and
    accuracy), its standard error ``eval-loss-stderr`` and ``eval-records`` (records scored)."""
    import torch

    scored = {"eval-records": float(sample.records)}
    if train.train_kind == "dpo":
        m = pair_margins(model, sample.ids, sample.roles, train.dpo_beta)
        loss = torch.nn.functional.softplus(-m)
        return scored | {
            "eval-loss": float(loss.mean()),
            "eval-loss-stderr": ratio_stderr(loss, torch.ones_like(loss), sample.population),
            "reward-margin": float(m.mean()),
            "reward-accuracy": float((m > 0).double().mean()),
        }
    nll, count = record_nll(model, sample.ids, sample.roles, sample.group)
    return scored | {
        "eval-loss": float(nll.sum()) / max(float(count.sum()), 1.0),
        "eval-loss-stderr": ratio_stderr(nll, count, sample.population),
    }


class SiteRecords:
    """The records of each kind a site holds, and their token rows per ``max-seq-len`` (cached)."""

    def __init__(self, policy: SitePolicy, loads: Counter[str], before_load: Callable[[], None]) -> None:
        self.policy = policy
        self.loads = loads  # the agent's counter of what this process loaded
        self._before_load = before_load  # e.g. the state dir's disk check
        self._data: dict[str, SiteData] = {}
        self._tokens: dict[tuple[str, int], tuple[Tokenized, Tokenized]] = {}
        self._samples: dict[tuple[str, int, int], HeldSample] = {}

    def check_kind(self, kind: str) -> None:
        """The site trains ``kind`` only if its policy allows it and it has records for it."""
        if kind not in self.policy.training.allowed_kinds:
            raise PolicyViolationError(
                f"train-kind {kind} is not in the site's [training] allowed-kinds "
                f"({', '.join(self.policy.training.allowed_kinds)}): the site refuses"
            )
        if self.policy.records_of(kind) is None:
            raise PolicyViolationError(
                f"the site has no records for train-kind {kind} ([data] {kind}-path is not set): "
                "the site refuses"
            )

    def data(self, kind: str = "sft") -> SiteData:
        """Validated, scrubbed, split records of ``kind`` (cached in memory and in the state dir)."""
        if kind not in self._data:
            self._before_load()
            self._data[kind] = load_site_data(self.policy, kind)
            self.loads["data"] += 1
        return self._data[kind]

    def loaded(self, kind: str) -> SiteData | None:
        """``kind``'s records if they are loaded already."""
        return self._data.get(kind)

    def too_long(self, kind: str, max_len: int) -> int:
        """Records of ``kind`` left out at ``max_len`` because their label did not fit."""
        rows = self._tokens.get((kind, max_len))
        return sum(len(t.too_long) for t in rows) if rows else 0

    def tokens(self, kind: str, max_len: int, tokenizer: Any) -> tuple[Tokenized, Tokenized]:
        """Train and held-out token rows of ``kind`` at ``max_len``; refuses if no record fits."""
        key = (kind, max_len)
        if key not in self._tokens:
            d, chunk = self.data(kind), self.policy.data.long_records == "chunk"
            train = tokenize_examples(d.train, tokenizer, max_len, chunk=chunk)
            held = tokenize_examples(d.eval, tokenizer, max_len, chunk=chunk)
            self._tokens[key] = (train, held)
            if left_out := self.too_long(kind, max_len):
                log.warning(
                    "site %s: %d of %d records have a response longer than max-seq-len %d tokens; they "
                    "are left out of training and evaluation (a cut label is never trained on)",
                    self.policy.name, left_out, len(d.train) + len(d.eval), max_len,
                )  # fmt: skip
            self.loads["tokenize"] += 1
        train, held = self._tokens[key]
        if train.records == 0 or held.records == 0:
            raise PolicyViolationError(
                f"no {'training' if train.records == 0 else 'held-out'} record's response fits in "
                f"max-seq-len {max_len} tokens: the site refuses (ask for a longer max-seq-len)"
            )
        return train, held

    def held_sample(self, kind: str, max_len: int, tokenizer: Any, limit: int) -> HeldSample:
        """The fixed sample of ``kind``'s held-out records scored at ``max_len`` (``limit`` 0: all)."""
        key = (kind, max_len, limit)
        if key not in self._samples:
            _, held = self.tokens(kind, max_len, tokenizer)
            texts = [e.text for e in self.data(kind).eval]
            self._samples[key] = sample_held(held, texts, limit)
        return self._samples[key]

    def score(self, train: TrainConfig, model: Any, sample: HeldSample) -> dict[str, float]:
        """:func:`held_out` on ``sample``, counted in ``loads["held-out"]`` (held-out forward passes)."""
        self.loads["held-out"] += 1
        return held_out(train, model, sample)
