"""The site agent below the Flower layer: one explicit recipe per training request.

Lifecycle. :meth:`SiteAgent.setup` once per process (cached; every request calls it): state dir, data
(validated, scrubbed, split), base-model fingerprint, tokenizer; the model loads for the request's LoRA
layout. Each request then runs, in this order, and stops at the first step that says no:

1. **parse** the request: every key present, every value in its domain (``TrainRequest``);
2. **ledger continuity**: the ledger verifies, reaches its head record and holds the last entry the
   coordinator saw (otherwise the site stops with an error: it never writes to a ledger it cannot trust);
3. **check** the request against the site: policy ceilings, base model, LoRA layout, the global adapter
   (shapes, dtypes, finite, a finite held-out loss);
4. **budget gate** (``privacy.budget``) inside a ledger transaction: reserve (write-ahead), or refuse;
5. **train** with the train step (DP-SGD, :data:`client.train.TrainStep`; training kinds plug in here);
   an update that is not finite is never sent (``abort``, its epsilon stays spent);
6. **commit** and reply with the committed entry as the receipt.

A request refused at steps 1, 3 or 4 is recorded in the ledger as a ``refuse`` entry and never reaches a
reservation. The coordinator's request is only a request: every decision here comes from the site's
own policy and ledger.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from client import faults
from client.compute import Compute, check_fit, load_base, peft_for_dp, resolve
from client.data import SiteData
from client.evaluation import EvalCache, cached, eval_key, full_requested, reported
from client.outcome import RoundOutcome
from client.policy import SitePolicy
from client.records import SiteRecords, objective_for
from client.tokens import Tokenized
from client.train import DPPlan, TrainStep, train_dp
from common.arrays import check_update, decode, encode, spec_of, to_record, to_state, update_sha256
from common.config import LoraSpec, TrainRequest
from common.errors import BudgetExceededError, ConfigError, PolicyViolationError
from common.modeling import adapter_state, load_adapter_state, load_tokenizer, model_fingerprint
from privacy.accounting_store import use_persistent_cache
from privacy.budget import RoundRequest, admit
from privacy.keys import SigningKey, load_signing_key
from privacy.ledger import LedgerState, PrivacyLedger
from privacy.ledger_entries import Entry, Reserve

log = logging.getLogger(__name__)
NO_CLIPPING = 1e9  # clip norm of the non-private baseline: no gradient is ever that large
MIN_FREE_BYTES = 64 * 2**20  # below this the state dir's disk counts as full
REFUSALS = (PolicyViolationError, BudgetExceededError, ConfigError)


class SiteAgent:
    """One site's long-lived state in a process (policy, key, ledger, data, model)."""

    def __init__(self, policy: SitePolicy, *, train_step: TrainStep | None = None) -> None:
        self.policy = policy
        self.train_step: TrainStep = train_step or train_dp
        self.key: SigningKey | None = _signing_key(policy)
        self.ledger = PrivacyLedger(
            policy.ledger_path,
            signer=self.key.sign if self.key else None,
            head_path=policy.ledger_head,
            site=policy.name,
        )
        self._round_kind = "sft"  # the kind of the request being answered
        self._model: Any = None
        self._lora: LoraSpec | None = None
        self._template: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._fingerprint: str | None = None
        self._compute: Compute | None = None
        self.local_rank: int | None = None  # rank 0 of several on this machine (client.distributed)
        self.loads: Counter[str] = Counter()  # what this process loaded or scored, how often (worker stats)
        self.records = SiteRecords(policy, self.loads, self.check_state_dir)
        self.eval_cache = EvalCache(policy.state_dir / "eval-cache.json")  # scores of adapters seen
        use_persistent_cache(policy.state_dir / "accounting-cache")  # composed ledger prefixes

    # ---------------------------------------------------------------- setup (cached)
    def check_state_dir(self) -> None:
        """Fail before any budget is spent if the state dir cannot be written or its disk is full."""
        d, problem = self.policy.state_dir, ""
        if d.exists() and not d.is_dir():
            problem = "is a file, not a folder: point state-dir at a folder"
        try:
            if not problem:
                d.mkdir(parents=True, exist_ok=True)
                (probe := d / ".write-probe").write_text("ok", encoding="utf-8")
                probe.unlink()
        except OSError as exc:
            problem = f"is not writable ({exc.strerror}): give the agent's user write access or point "
            problem += "state-dir elsewhere"
        if not problem and (free := shutil.disk_usage(d).free) < MIN_FREE_BYTES:
            problem = f"has {free / 2**20:.1f} MiB free, less than the {MIN_FREE_BYTES // 2**20} MiB the "
            problem += "ledger and caches need: free space before training"
        if problem:
            raise ConfigError(str(self.policy.source), [f"[site] state-dir '{d}' {problem}"])

    def setup(self) -> SiteData:
        """Once per process, then cheap: the state dir writable, the data prepared, the model identified.

        The state dir is checked on every call, so a disk that filled up fails before a reservation.
        """
        self.check_state_dir()
        data = self.data()
        self.model_fingerprint()
        self.compute()
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.policy.model_path)
        return data

    def data(self, kind: str = "sft") -> SiteData:
        """Validated, scrubbed, split records of ``kind`` (cached in memory and in the state dir)."""
        return self.records.data(kind)

    def model_fingerprint(self) -> str:
        """Fingerprint of the site's local base model."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.policy.model_path)
            self.loads["weight-hash"] += 1
        return self._fingerprint

    def compute(self) -> Compute:
        """The site's compute plan (``[compute]`` on this machine); the base model must fit it."""
        if self._compute is None:
            where = f"{self.policy.source} [compute]"
            plan = resolve(self.policy.compute, where=where, local_rank=self.local_rank)
            check_fit(self.policy.model_path, plan, where=where)
            self._compute = plan
            log.info("site %s trains on %s", self.policy.name, plan.describe())
        return self._compute

    @property
    def lora(self) -> LoraSpec | None:
        """The LoRA layout of the model in memory (``None`` before the first request)."""
        return self._lora

    def _peft(self, lora: LoraSpec) -> Any:
        if self._model is None or self._lora != lora:
            self._model = None  # the old model's memory goes before the new one loads
            base = load_base(self.policy.model_path, self.compute())
            self.loads["model"] += 1
            try:
                self._model = peft_for_dp(base, lora, self.compute())
            except ValueError as exc:  # PEFT: a target module the base model does not have
                self._model, self._lora = None, None
                raise PolicyViolationError(
                    f"the requested LoRA layout does not fit the base model: {exc}"
                ) from None
            self._lora = lora
            self._template = spec_of(to_record(adapter_state(self._model)))
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.policy.model_path)
        return self._model

    # ---------------------------------------------------------------- step 3: the request vs the site
    def _load_global(self, req: TrainRequest, arrays: ArrayRecord) -> Any:
        """The site's model holding the coordinator's global adapter, after checking both."""
        pol = self.policy
        t, top = req.train, pol.training
        checks = (
            ("learning rate", t.learning_rate, "max-learning-rate", top.max_learning_rate),
            ("max-seq-len", t.max_seq_len, "max-seq-len", top.max_seq_len),
            ("LoRA rank", req.lora.rank, "max-lora-rank", top.max_lora_rank),
        )
        broken = [f"{w} {_num(v)} is above the site's {k} {_num(cap)}" for w, v, k, cap in checks if v > cap]
        if broken:
            raise PolicyViolationError("; ".join(broken) + ": the site refuses")
        if req.base_model_fingerprint != self.model_fingerprint():
            raise PolicyViolationError(
                "the coordinator's base model differs from this site's [model] path "
                f"(fingerprint {req.base_model_fingerprint[:12]} vs {self.model_fingerprint()[:12]}): "
                "install the same base model at the site"
            )
        model = self._peft(req.lora)
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and req.train.max_seq_len > positions:
            raise PolicyViolationError(
                f"max-seq-len {req.train.max_seq_len} exceeds the base model's {positions} positions"
            )
        problems = check_update(arrays, self._template)
        if problems:
            raise PolicyViolationError("the global adapter is malformed: " + "; ".join(problems[:3]))
        try:
            load_adapter_state(model, to_state(arrays))
        except (ValueError, RuntimeError) as exc:
            raise PolicyViolationError(f"the global adapter does not fit the base model: {exc}") from None
        return model

    # ---------------------------------------------------------------- the round
    def train_round(self, arrays: ArrayRecord, request: TrainRequest | Mapping[str, Any]) -> RoundOutcome:
        """Answer one training request: refuse with a recorded reason, or train and reply."""
        pol = self.policy
        self.setup()
        self._round_kind = "sft"
        try:
            req = request if isinstance(request, TrainRequest) else TrainRequest.from_record(request)
        except ConfigError as exc:
            rnd, run = TrainRequest.salvage(request if isinstance(request, Mapping) else {})
            return self._refuse(rnd, run, exc)
        self.ledger.state(expect=(req.ledger_seq, req.ledger_hash))  # LedgerError: stop, write nothing
        kind = self._round_kind = req.train.train_kind
        try:
            self.records.check_kind(kind)
            data = self.data(kind)
            model = self._load_global(req, arrays)
            train = self.records.tokens(kind, req.train.max_seq_len, self._tokenizer)[0]
            before = self.held_out(req, model, arrays)
            if not math.isfinite(before["eval-loss"]):
                raise PolicyViolationError(
                    "the global adapter gives a non-finite held-out loss: the site refuses it"
                )
        except REFUSALS as exc:
            return self._refuse(req.server_round, req.run_id, exc)
        ask = RoundRequest(
            run_id=req.run_id,
            round=req.server_round,
            num_rounds=req.num_rounds,
            sample_rate=min(1.0, req.train.batch_size / train.records),
            steps=req.train.local_steps,
            max_grad_norm=req.train.max_grad_norm,
            noise_multiplier=req.train.noise_multiplier,
            private=req.train.dp,
            seeded=req.train.seed >= 0,
            train_kind=kind,
        )
        try:
            with self.ledger.transaction(expect=(req.ledger_seq, req.ledger_hash)) as tx:
                grant, entry = admit(tx, pol.privacy, ask, data_fingerprint=data.fingerprint)
        except REFUSALS as exc:  # the refusal is already in the ledger
            return self._refusal(exc, self.ledger.state())
        if not grant.private:
            log.warning("site %s trains round %d WITHOUT differential privacy", pol.name, req.server_round)
        plan = DPPlan(
            grant.noise_multiplier,
            grant.sample_rate,
            grant.steps,
            grant.max_grad_norm if grant.private else NO_CLIPPING,
            req.train.batch_size,
        )
        return self._train(req, model, train, plan, before, arrays, entry)

    def _train(
        self,
        req: TrainRequest,
        model: Any,
        train: Tokenized,
        plan: DPPlan,
        before: dict[str, float],
        start: ArrayRecord,
        entry: Entry,
    ) -> RoundOutcome:
        """Steps 5 and 6: train, check the update, commit (or abort) the reservation ``entry``."""
        pol = self.policy
        fault = faults.active(pol.name, req.server_round)
        if fault == "raise":
            raise faults.InjectedFault(f"injected crash at site {pol.name} in round {req.server_round}")
        stats = self.train_step(
            model, train.ids, train.roles, plan, learning_rate=req.train.learning_rate,
            seed=self._round_seed(req), group=train.group if train.chunked else None,
            objective=objective_for(req.train),
        )  # fmt: skip
        state = adapter_state(model)
        record = encode({k: state[k] for k in req.lora.update_keys(state)}, req.train.wire_dtype)
        finite = all(np.isfinite(decode(a)).all() for a in record.values())  # float16 can overflow
        if not finite or (stats.mean_loss is not None and not math.isfinite(stats.mean_loss)):
            reason = (
                "training diverged (non-finite loss or update): nothing was sent; the reservation stays spent"
            )
            self.ledger.abort(reserve_seq=entry.seq, reason=reason)
            log.error("site %s round %d: %s", pol.name, req.server_round, reason)
            return self._refusal(PolicyViolationError(reason), self.ledger.state())
        if fault is not None:  # a compromised site: corrupts what it sends, and signs it
            record = faults.corrupt(fault, record, start)
        metrics: dict[str, float] = {
            "eval-loss-before": before["eval-loss"],
            **{f"{k}-before": v for k, v in reported(before, pol.evaluation).items() if k != "eval-loss"},
            "train-batches": float(stats.batches),
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate,
            "steps": float(plan.steps),
            "records-too-long": float(self.records.too_long(req.train.train_kind, req.train.max_seq_len)),
        }
        if stats.mean_loss is not None:
            metrics["train-loss"] = stats.mean_loss
        commit_metrics = {"train_loss": stats.mean_loss} if stats.mean_loss is not None else {}
        commit = self.ledger.commit(
            reserve_seq=entry.seq,
            update_sha256=update_sha256(record),
            num_examples=train.records,
            metrics=commit_metrics,
        )
        out = self._outcome(True, "", self.ledger.state(), commit)
        out.arrays, out.num_examples, out.train_kind = record, train.records, req.train.train_kind
        out.metrics |= metrics
        if isinstance(entry, Reserve):
            out.metrics |= {"epsilon": entry.epsilon, "epsilon-rdp": entry.epsilon_rdp}
        return out

    def _round_seed(self, req: TrainRequest) -> int | None:
        """Testing only: a seed per (run seed, site, round), so sites and rounds draw different noise."""
        if req.train.seed < 0:
            return None
        digest = hashlib.sha256(f"{req.train.seed}|{self.policy.name}|{req.server_round}".encode()).digest()
        return int.from_bytes(digest[:7], "big")

    def _refuse(self, rnd: int, run_id: str, exc: Exception) -> RoundOutcome:
        """Record a refusal decided before the budget gate, and answer with it."""
        self.ledger.record_refusal(round=rnd, run_id=run_id, reason=str(exc))
        return self._refusal(exc, self.ledger.state())

    def _refusal(self, exc: Exception, state: LedgerState) -> RoundOutcome:
        log.warning("site %s refuses: %s", self.policy.name, exc)
        return self._outcome(False, str(exc), state, state.entries[-1] if state.entries else None)

    def _outcome(self, trained: bool, reason: str, state: LedgerState, receipt: Entry | None) -> RoundOutcome:
        pol = self.policy
        spent = state.epsilon(delta=pol.privacy.delta, accountant=pol.privacy.accountant)
        metrics = {
            "delta": pol.privacy.delta,
            "max-epsilon": pol.privacy.max_epsilon,
            "private": float(math.isfinite(spent)),
        }
        if math.isfinite(spent):
            metrics["epsilon"] = spent
        return RoundOutcome(
            site=pol.name,
            trained=trained,
            reason=reason,
            metrics=metrics,
            scrub_counts=dict(data.scrub_counts) if (data := self.records.loaded(self._round_kind)) else {},
            receipt=dict(receipt.raw) if receipt is not None else {},
            public_key=self.key.public_pem if self.key else "",
        )

    def evaluate(
        self, arrays: ArrayRecord, request: TrainRequest | Mapping[str, Any]
    ) -> tuple[dict[str, float], int]:
        """Held-out metrics of the global adapter (no budget spent) and the held-out record count.

        ``eval-loss`` (dpo: also ``reward-margin``, ``reward-accuracy``); ``eval-full = true`` beside
        the request's keys asks for every record (scored only if ``allow-full-on-request``)."""
        self.setup()
        request, full = full_requested(request, self.policy.evaluation, self.policy.name)
        req = request if isinstance(request, TrainRequest) else TrainRequest.from_record(request)
        self.records.check_kind(req.train.train_kind)
        model = self._load_global(req, arrays)
        metrics = self.held_out(req, model, arrays, full=full)
        held = self.records.tokens(req.train.train_kind, req.train.max_seq_len, self._tokenizer)[1]
        return reported(metrics, self.policy.evaluation), held.records

    def held_out(
        self, req: TrainRequest, model: Any, arrays: ArrayRecord, *, full: bool = False
    ) -> dict[str, float]:
        """Held-out metrics of ``model`` holding ``arrays``, once per adapter (``client.evaluation``)."""
        limit = 0 if full else self.policy.evaluation.max_records
        sample = self.records.held_sample(req.train.train_kind, req.train.max_seq_len, self._tokenizer, limit)
        key = eval_key(update_sha256(arrays), sample, req, self.model_fingerprint(), self.compute())
        return cached(self.eval_cache, key, lambda: self.records.score(req.train, model, sample))


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _signing_key(policy: SitePolicy) -> SigningKey | None:
    """The ledger key from the policy's signing key (None: entries are hash-chained only)."""
    if policy.signing_key is None:
        return None
    env = policy.site.signing_key_passphrase_env
    if env and env not in os.environ:
        raise ConfigError(
            str(policy.source),
            [f"[site] signing-key-passphrase-env names '{env}' but it is not set in the agent's environment"],
        )
    passphrase = os.environ[env].encode() if env else None
    return load_signing_key(policy.signing_key, passphrase)


_AGENTS: dict[str, SiteAgent] = {}


def get_agent(policy: SitePolicy) -> SiteAgent:
    """The process-wide agent for a policy (rebuilt when the policy changes)."""
    key = str(policy.source)
    agent = _AGENTS.get(key)
    if agent is None or agent.policy != policy:
        agent = _AGENTS[key] = SiteAgent(policy)
    return agent
