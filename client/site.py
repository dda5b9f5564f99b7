"""The site agent below the Flower layer: one round of policy check, budget, DP training.

``SiteAgent`` holds what is slow to build (scrubbed data, tokenizer, model) for the life
of a process. Every decision that protects the site -- model identity, noise floor,
budget -- is taken here, from the site's own policy and ledger; the coordinator's
request is only a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord

from client import faults
from client.data import (
    SiteData,
    fingerprint,
    format_example,
    load_records,
    split_texts,
    tokenize,
)
from client.policy import SitePolicy, scrub_config
from client.train import DPPlan, evaluate_loss, train_dp
from common.arrays import to_record, to_state, update_sha256
from common.config import LoraSpec, TrainRequest
from common.errors import BudgetExceededError, ConfigError, PolicyViolationError
from common.fsutil import atomic_write_text, file_sha256
from common.modeling import (
    adapter_state,
    load_adapter_state,
    load_base_model,
    load_tokenizer,
    make_peft_model,
    model_fingerprint,
)
from privacy.accounting import MechanismStep, calibrate_noise, epsilon
from privacy.keys import load_signer
from privacy.ledger import PrivacyLedger
from privacy.pii import get_scrubber

log = logging.getLogger(__name__)
SCRUB_VERSION = "2"  # bump whenever scrubbing output changes: cached scrubbed text is then redone
# The commit entry's fields a site returns as its receipt; the coordinator keeps them, so a site ledger
# truncated or rewritten later disagrees with the coordinator's copy.
NO_CLIPPING = 1e9  # clip norm of the non-private baseline: no gradient is ever that large
RECEIPT_FIELDS = ("seq", "hash", "signature", "round", "run_id", "update_sha256")
MIN_FREE_BYTES = 64 * 2**20  # below this the state dir's disk counts as full


@dataclass
class RoundOutcome:
    """A site's answer to one training request."""

    site: str
    trained: bool
    reason: str = ""
    arrays: ArrayRecord | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    scrub_counts: dict[str, int] = field(default_factory=dict)
    receipt: dict[str, Any] = field(default_factory=dict)


class SiteAgent:
    """One site's long-lived state in a process (data, model, ledger)."""

    def __init__(self, policy: SitePolicy, *, seed: int | None = None) -> None:
        self.policy = policy
        self.seed = seed
        self.ledger = PrivacyLedger(policy.ledger_path, signer=_signer(policy))
        self._data: SiteData | None = None
        self._model: Any = None
        self._lora: LoraSpec | None = None
        self._tokenizer: Any = None
        self._fingerprint: str | None = None
        self._tensors: dict[int, tuple[torch.Tensor, ...]] = {}

    # ----------------------------------------------------------------- data
    def check_state_dir(self) -> None:
        """Fail before any budget is spent if the state dir cannot be written or its disk is full."""
        d = self.policy.state_dir
        if d.exists() and not d.is_dir():
            raise ConfigError(
                str(self.policy.source),
                [f"[site] state-dir '{d}' is a file, not a folder: point state-dir at a folder"],
            )
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / ".write-probe"
            probe.write_text("ok", encoding="utf-8")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                str(self.policy.source),
                [
                    f"[site] state-dir '{d}' is not writable ({exc.strerror}): "
                    "give the agent's user write access or point state-dir elsewhere"
                ],
            ) from None
        free = shutil.disk_usage(d).free
        if free < MIN_FREE_BYTES:
            raise ConfigError(
                str(self.policy.source),
                [
                    f"[site] state-dir '{d}' has {free / 2**20:.1f} MiB free, less than the "
                    f"{MIN_FREE_BYTES // 2**20} MiB the ledger and caches need: free space before training"
                ],
            )

    def data(self) -> SiteData:
        """Validated, scrubbed, split site data (cached in memory and in the state dir)."""
        if self._data is not None:
            return self._data
        pol = self.policy
        self.check_state_dir()
        records = load_records(pol.data_path, pol.text_fields, max_chars=pol.max_record_chars)
        scrub_cfg = scrub_config(pol)
        settings = (
            file_sha256(pol.data_path), ",".join(pol.text_fields), scrub_cfg.spacy_model, scrub_cfg.operator,
            json.dumps(sorted(dict(scrub_cfg.entity_operators).items())), str(scrub_cfg.keep_date_year),
            fingerprint([scrub_cfg.pseudonym_key.decode("latin-1")]) if scrub_cfg.pseudonym_key else "",
            SCRUB_VERSION,
        )  # fmt: skip
        cache = pol.state_dir / "scrub" / f"{fingerprint(settings)[:32]}.json"
        if cache.is_file():
            cached = json.loads(cache.read_text(encoding="utf-8"))
            texts, counts, touched = cached["texts"], cached["counts"], cached["records_touched"]
        else:
            scrubber = get_scrubber(scrub_cfg)
            clean, report = scrubber.scrub_records(records, pol.text_fields)
            texts = [format_example(r, pol.text_fields) for r in clean]
            counts, touched = dict(report.counts), report.records_touched
            atomic_write_text(
                cache, json.dumps({"texts": texts, "counts": counts, "records_touched": touched})
            )
            # the privacy office's view: counts per entity type, never values
            atomic_write_text(pol.state_dir / "scrub-report.json", json.dumps(report.to_dict(), indent=2))
        train, held = split_texts(texts, pol.eval_fraction)
        self._data = SiteData(tuple(train), tuple(held), fingerprint(train), counts, touched)
        return self._data

    # ---------------------------------------------------------------- model
    def model_fingerprint(self) -> str:
        """Fingerprint of the site's local base model."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.policy.model_path)
        return self._fingerprint

    def _peft(self, lora: LoraSpec) -> Any:
        if self._model is None or self._lora != lora:
            base = load_base_model(self.policy.model_path)
            self._model = make_peft_model(base, lora)
            self._lora = lora
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.policy.model_path)
        return self._model

    def _tensors_for(self, max_len: int) -> tuple[torch.Tensor, ...]:
        if max_len not in self._tensors:
            d = self.data()
            tr = tokenize(d.train, self._tokenizer, max_len)
            ev = tokenize(d.eval, self._tokenizer, max_len)
            self._tensors[max_len] = (*tr, *ev)
        return self._tensors[max_len]

    def _load_global(self, req: TrainRequest, arrays: ArrayRecord) -> Any:
        if req.base_model_fingerprint != self.model_fingerprint():
            raise PolicyViolationError(
                "the coordinator's base model differs from this site's [model] path "
                f"(fingerprint {req.base_model_fingerprint[:12]} vs {self.model_fingerprint()[:12]}): "
                "install the same base model at the site"
            )
        model = self._peft(req.lora)
        try:
            load_adapter_state(model, to_state(arrays))
        except (ValueError, RuntimeError) as exc:
            raise PolicyViolationError(f"the global adapter does not fit the base model: {exc}") from None
        return model

    # --------------------------------------------------------------- rounds
    def plan(self, req: TrainRequest, n_train: int) -> DPPlan:
        """The round's DP mechanism: requested noise (checked) or calibrated to the budget.

        Calibration spreads the remaining budget over the remaining planned rounds; later
        rounds of the same run reuse the calibrated noise, so every round of a run shares
        one mechanism (and the accountant stays fast).
        """
        pol = self.policy
        q = min(1.0, req.batch_size / n_train)
        limits = [
            (
                q > pol.max_sample_rate,
                f"sample rate {q:.4g} (batch-size {req.batch_size} / {n_train} "
                f"records) is above the site's max-sample-rate {pol.max_sample_rate:g}",
            ),
            (
                req.max_grad_norm > pol.max_grad_norm,
                f"clip norm {req.max_grad_norm:g} is above the site's max-grad-norm {pol.max_grad_norm:g}",
            ),
            (
                req.local_steps > pol.max_steps_per_round,
                f"{req.local_steps} local steps are above the "
                f"site's max-steps-per-round {pol.max_steps_per_round}",
            ),
        ]
        broken = [why for bad, why in limits if bad]
        if broken:
            raise PolicyViolationError("; ".join(broken) + ": the site refuses")
        if not req.dp:
            if not pol.allow_non_private:
                raise PolicyViolationError(
                    "the coordinator asked for training WITHOUT differential privacy and the site's "
                    "[privacy] allow-non-private is false: the site refuses"
                )
            # same sampling, loss and optimizer as DP-SGD; no clipping, no noise, no budget spent
            return DPPlan(0.0, q, req.local_steps, NO_CLIPPING, req.batch_size)
        if req.noise_multiplier > 0:
            if req.noise_multiplier < pol.min_noise_multiplier:
                raise PolicyViolationError(
                    f"requested noise multiplier {req.noise_multiplier:g} is below the site's "
                    f"min-noise-multiplier {pol.min_noise_multiplier:g}: the site refuses"
                )
            return DPPlan(req.noise_multiplier, q, req.local_steps, req.max_grad_norm, req.batch_size)
        for e in reversed(self.ledger.entries()):
            if (
                e.get("kind") == "reserve"
                and e.get("run_id") == req.run_id
                and e.get("sample_rate") == q
                and e.get("steps") == req.local_steps
            ):
                sigma = float(e["noise_multiplier"])
                break
        else:
            sigma = calibrate_noise(
                history=self.ledger.history(),
                target_epsilon=pol.max_epsilon,
                delta=pol.delta,
                sample_rate=q,
                steps=req.local_steps,
                rounds=max(1, req.num_rounds - req.server_round + 1),
                accountant=pol.accountant,
            )
        sigma = max(sigma, pol.min_noise_multiplier)
        return DPPlan(sigma, q, req.local_steps, req.max_grad_norm, req.batch_size)

    def train_round(self, arrays: ArrayRecord, req: TrainRequest) -> RoundOutcome:
        """Answer one training request: refuse with a reason, or train and reply."""
        pol = self.policy
        data = self.data()
        self.check_state_dir()  # every round: a disk that filled up since must fail before the reservation
        try:
            model = self._load_global(req, arrays)
            ids, mask, ev_ids, ev_mask = self._tensors_for(req.max_seq_len)
            dp = self.plan(req, len(data.train))
        except (BudgetExceededError, PolicyViolationError) as exc:
            self.ledger.record_refusal(round=req.server_round, run_id=req.run_id, reason=str(exc))
            return self._refusal(req, exc)
        eval_before = evaluate_loss(model, ev_ids, ev_mask)
        if not req.dp:
            log.warning("site %s trains round %d WITHOUT differential privacy", pol.name, req.server_round)
            return self._finish(req, model, ids, mask, dp, eval_before, arrays, entry=None)
        try:
            entry = self.ledger.reserve(
                round=req.server_round,
                run_id=req.run_id,
                step=MechanismStep(dp.noise_multiplier, dp.sample_rate, dp.steps),
                max_grad_norm=dp.max_grad_norm,
                delta=pol.delta,
                max_epsilon=pol.max_epsilon,
                data_fingerprint=data.fingerprint,
                accountant=pol.accountant,
            )
        except (BudgetExceededError, PolicyViolationError) as exc:  # refusal already in the ledger
            return self._refusal(req, exc)
        return self._finish(req, model, ids, mask, dp, eval_before, arrays, entry=entry)

    def _finish(
        self,
        req: TrainRequest,
        model: Any,
        ids: torch.Tensor,
        mask: torch.Tensor,
        dp: DPPlan,
        eval_before: float,
        start: ArrayRecord,
        *,
        entry: dict[str, Any] | None,
    ) -> RoundOutcome:
        """Train, build the reply, then commit the reservation (``entry``; None = non-private)."""
        pol, data = self.policy, self.data()
        fault = faults.active(pol.name, req.server_round)
        if fault == "raise":
            raise faults.InjectedFault(f"injected crash at site {pol.name} in round {req.server_round}")
        stats = train_dp(model, ids, mask, dp, learning_rate=req.learning_rate, seed=self._round_seed(req))
        state = adapter_state(model)
        record = to_record({k: state[k] for k in req.lora.update_keys(state)})
        if fault is not None:
            record = faults.corrupt(fault, record, start)
        metrics = {
            "train-loss": stats.mean_loss,
            "eval-loss-before": eval_before,
            "delta": pol.delta,
            "max-epsilon": pol.max_epsilon,
            "noise-multiplier": dp.noise_multiplier,
            "sample-rate": dp.sample_rate,
            "steps": float(dp.steps),
        }
        receipt: dict[str, Any] = {"update_sha256": update_sha256(record)}
        if entry is not None:
            metrics |= {"epsilon": float(entry["epsilon"]), "epsilon-rdp": float(entry["epsilon_rdp"])}
            commit = self.ledger.commit(
                reserve_seq=int(entry["seq"]),
                update_sha256=receipt["update_sha256"],
                num_examples=len(data.train),
                metrics={"train_loss": stats.mean_loss},
            )
            receipt = {k: commit[k] for k in RECEIPT_FIELDS if k in commit}
        return RoundOutcome(
            site=pol.name,
            trained=True,
            arrays=record,
            num_examples=len(data.train),
            metrics=metrics,
            scrub_counts=data.scrub_counts,
            receipt=receipt,
        )

    def _round_seed(self, req: TrainRequest) -> int | None:
        """Testing only: a seed per (run seed, site, round), so sites and rounds draw different noise."""
        if self.seed is None:
            return None
        digest = hashlib.sha256(f"{self.seed}|{self.policy.name}|{req.server_round}".encode()).digest()
        return int.from_bytes(digest[:7], "big")

    def _refusal(self, req: TrainRequest, exc: Exception) -> RoundOutcome:
        pol = self.policy
        reason = str(exc)
        log.warning("site %s refuses round %d: %s", pol.name, req.server_round, reason)
        spent = epsilon(self.ledger.history(), delta=pol.delta, accountant=pol.accountant)
        return RoundOutcome(
            site=pol.name,
            trained=False,
            reason=reason,
            metrics={"epsilon": spent, "delta": pol.delta, "max-epsilon": pol.max_epsilon},
        )

    def evaluate(self, arrays: ArrayRecord, req: TrainRequest) -> tuple[float, int]:
        """Held-out loss of the global adapter at this site (spends no budget)."""
        model = self._load_global(req, arrays)
        _, _, ev_ids, ev_mask = self._tensors_for(req.max_seq_len)
        return evaluate_loss(model, ev_ids, ev_mask), int(ev_ids.size(0))


def _signer(policy: SitePolicy) -> Callable[[bytes], str] | None:
    """The ledger signer from the policy's signing key (None: entries are hash-chained only)."""
    if policy.signing_key is None:
        return None
    env = policy.signing_key_passphrase_env
    if env and env not in os.environ:
        raise ConfigError(
            str(policy.source),
            [f"[site] signing-key-passphrase-env names '{env}' but it is not set in the agent's environment"],
        )
    passphrase = os.environ[env].encode() if env else None
    return load_signer(policy.signing_key, passphrase)


_AGENTS: dict[tuple[str, int | None], SiteAgent] = {}


def get_agent(policy: SitePolicy, seed: int | None = None) -> SiteAgent:
    """The process-wide agent for a policy (rebuilt when the policy changes)."""
    key = (str(policy.source), seed)
    agent = _AGENTS.get(key)
    if agent is None or agent.policy != policy:
        agent = _AGENTS[key] = SiteAgent(policy, seed=seed)
    return agent
