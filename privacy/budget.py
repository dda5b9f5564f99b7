"""The budget gate: whether a round may spend this site's privacy budget, and with which noise.

The most privacy-critical decision of the product, kept apart so it can be tested alone. The site's
policy (:class:`BudgetPolicy`) decides; the coordinator's request (:class:`RoundRequest`) only asks.
:func:`decide` is pure (a verified :class:`~privacy.ledger.LedgerState` in, a :class:`Grant` or a
:class:`Refused` out); :func:`admit` runs it inside a ledger transaction and writes the outcome: a
``reserve`` (or, for an allowed non-private round, a ``release``) or a ``refuse`` entry.

Ceilings, all from the policy:

* lifetime ``max-epsilon`` (every reservation of the ledger, any run, composed);
* ``max-epsilon-per-run`` (the reservations of one run id; default: ``max-epsilon``);
* ``max-epsilon-per-round`` (one round's mechanism alone; default: half of ``max-epsilon``, so no single
  request -- e.g. a run of one round -- can spend a lifetime's budget at once);
* noise floor, sample-rate, clip and step ceilings; ``max-round-retries`` reservations of a round that
  never committed (a crash); rounds of a run only go forward; a committed round is never trained again;
* seeded (predictable) noise only with ``allow-seeded-noise`` (testing), non-private rounds only with
  ``allow-non-private`` -- and after one, the records count as released: every later DP round is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from common.declare import Rule, above, at_least, fraction, one_of, option, within
from common.errors import BudgetExceededError, PolicyViolationError
from privacy.accounting import MechanismStep, calibrate_noise, epsilon
from privacy.ledger import LedgerState, Transaction
from privacy.ledger_entries import Release, Reserve

__all__ = ["BudgetPolicy", "Grant", "Refused", "RoundRequest", "admit", "decide"]


def _positive(x: float) -> bool:
    return x > 0


@dataclass(frozen=True)
class BudgetPolicy:
    """The site's budget rules: the ``[privacy]`` section of its policy, declared here once."""

    max_epsilon: float = option("max-epsilon", 8.0, "the site's lifetime privacy budget", above(0))
    delta: float = option("delta", 1e-5, "the site's delta", within(0, 1e-3, open_low=True))
    accountant: str = option(
        "accountant",
        "prv",
        "the accountant that enforces the budget",
        one_of(("prv", "rdp")),
    )
    max_epsilon_per_run: float | None = option(
        "max-epsilon-per-run",
        None,
        "ceiling of one run id's epsilon",
        Rule("a number > 0, at most max-epsilon (default: max-epsilon)", _positive),
    )
    max_epsilon_per_round: float | None = option(
        "max-epsilon-per-round", None, "ceiling of one round's epsilon, alone",
        Rule('a number > 0, at most max-epsilon-per-run (default: max-epsilon / 2)', _positive),
    )  # fmt: skip
    min_noise_multiplier: float = option(
        "min-noise-multiplier",
        0.3,
        "noise floor: requests below are refused",
        at_least(0),
    )
    max_sample_rate: float = option(
        "max-sample-rate",
        0.25,
        "ceiling on the Poisson sample rate",
        fraction(1),
    )
    max_grad_norm: float = option("max-grad-norm", 10.0, "ceiling on the clip norm", above(0))
    max_steps_per_round: int = option(
        "max-steps-per-round", 1000, "ceiling on DP-SGD steps per round", at_least(1)
    )
    max_round_retries: int = option(
        "max-round-retries",
        1,
        "re-reservations of a round that crashed before committing",
        at_least(0),
    )
    allow_non_private: bool = option(
        "allow-non-private",
        False,
        "training without DP",
        Rule("false; true only for benchmarks on synthetic data"),
    )
    allow_seeded_noise: bool = option(
        "allow-seeded-noise",
        False,
        "a coordinator's noise seed",
        Rule("false; true only for reproducible tests (NOT private)"),
    )

    @property
    def per_run(self) -> float:
        """The per-run ceiling in force."""
        return self.max_epsilon if self.max_epsilon_per_run is None else self.max_epsilon_per_run

    @property
    def per_round(self) -> float:
        """The per-round ceiling in force."""
        return self.max_epsilon / 2 if self.max_epsilon_per_round is None else self.max_epsilon_per_round

    def problems(self) -> list[str]:
        """The ceilings must nest: per round <= per run <= lifetime."""
        out = []
        if self.per_run > self.max_epsilon:
            out.append(f"max-epsilon-per-run {self.per_run:g} is above max-epsilon {self.max_epsilon:g}")
        if self.per_round > self.per_run:
            out.append(
                f"max-epsilon-per-round {self.per_round:g} is above max-epsilon-per-run {self.per_run:g}"
            )
        return out


@dataclass(frozen=True)
class RoundRequest:
    """What one training request asks of the budget (``noise_multiplier`` 0: the site calibrates)."""

    run_id: str
    round: int
    num_rounds: int
    sample_rate: float
    steps: int
    max_grad_norm: float
    noise_multiplier: float = 0.0
    private: bool = True
    seeded: bool = False
    train_kind: str = "sft"


@dataclass(frozen=True)
class Grant:
    """The mechanism a round may run."""

    private: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float


class Refused(PolicyViolationError):
    """The budget gate refuses the request; ``details`` go into the ``refuse`` entry."""

    def __init__(self, reason: str, **details: Any) -> None:
        self._init = ((reason,), dict(details))
        self.details = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in details.items()
        }
        super().__init__(reason)


@dataclass
class _Checks:
    broken: list[str] = field(default_factory=list)

    def need(self, ok: bool, why: str) -> None:
        if not ok:
            self.broken.append(why)


def decide(state: LedgerState, policy: BudgetPolicy, req: RoundRequest) -> Grant:
    """The mechanism ``req`` may run against the ledger ``state``; raise :class:`Refused` with the reason."""
    run, rnd = req.run_id, req.round
    if req.seeded and not policy.allow_seeded_noise:
        raise Refused(
            "the coordinator asked for seeded (reproducible, hence predictable) DP noise and the site's "
            "[privacy] allow-seeded-noise is false: the site refuses (seeded noise is for tests only)"
        )
    top = state.highest_round(run)
    if top is not None and rnd < top:
        raise Refused(f"round {rnd} of run {run} was requested after its round {top}: rounds only go forward")
    if state.committed(run, rnd):
        raise Refused(f"run {run!r} already trained round {rnd}; a round is never trained twice")
    tries = state.attempts(run, rnd)
    if tries > policy.max_round_retries:
        raise Refused(
            f"round {rnd} of run {run} was already reserved {tries} times without completing, more than the "
            f"site's max-round-retries {policy.max_round_retries}: its budget stays spent, the site refuses"
        )
    limits = _Checks()
    limits.need(
        req.sample_rate <= policy.max_sample_rate,
        f"sample rate {req.sample_rate:.4g} is above the site's max-sample-rate {policy.max_sample_rate:g}",
    )
    limits.need(
        req.max_grad_norm <= policy.max_grad_norm,
        f"clip norm {req.max_grad_norm:g} is above the site's max-grad-norm {policy.max_grad_norm:g}",
    )
    limits.need(
        req.steps <= policy.max_steps_per_round,
        f"{req.steps} local steps are above the site's max-steps-per-round {policy.max_steps_per_round}",
    )
    if limits.broken:
        raise Refused("; ".join(limits.broken) + ": the site refuses")
    if not req.private:
        if not policy.allow_non_private:
            raise Refused(
                "the coordinator asked for training WITHOUT differential privacy and the site's "
                "[privacy] allow-non-private is false: the site refuses"
            )
        return Grant(False, 0.0, req.sample_rate, req.steps, req.max_grad_norm)
    if state.release is not None:
        r = state.release
        raise Refused(
            f"this site's records were released WITHOUT differential privacy (round {r.round} of run "
            f"{r.run_id}, ledger entry seq {r.seq}): no DP guarantee is left to spend, the site refuses"
        )
    sigma = _noise(state, policy, req)
    step = MechanismStep(sigma, req.sample_rate, req.steps)
    numbers = {"noise_multiplier": sigma, "sample_rate": req.sample_rate, "steps": req.steps}
    one = epsilon([step], delta=policy.delta, accountant=policy.accountant)
    if one > policy.per_round:
        raise Refused(
            f"one round at noise {sigma:.4g} would spend epsilon {one:.4f}, above the site's "
            f"max-epsilon-per-round {policy.per_round:g}: the site refuses (ask for more noise or fewer "
            "steps)",
            requested_epsilon=one,
            **numbers,
        )
    # a run's epsilon never exceeds the lifetime one: at the default ceiling the ledger's check is the one
    in_run = epsilon([*state.history(run), step], delta=policy.delta, accountant=policy.accountant)
    if policy.per_run < policy.max_epsilon and in_run > policy.per_run:
        raise Refused(
            f"run {run} would reach epsilon {in_run:.4f}, above the site's max-epsilon-per-run "
            f"{policy.per_run:g}: the site refuses",
            requested_epsilon=in_run,
            **numbers,
        )
    return Grant(True, sigma, req.sample_rate, req.steps, req.max_grad_norm)


def _noise(state: LedgerState, policy: BudgetPolicy, req: RoundRequest) -> float:
    """The requested noise (checked against the floor), this run's earlier noise, or a calibrated one.

    Calibration spreads what is left under each ceiling over the run's remaining rounds and takes the
    largest noise any ceiling needs; later rounds of the run reuse it (one mechanism per run).
    """
    if req.noise_multiplier > 0:
        if req.noise_multiplier < policy.min_noise_multiplier:
            raise Refused(
                f"requested noise multiplier {req.noise_multiplier:g} is below the site's "
                f"min-noise-multiplier {policy.min_noise_multiplier:g}: the site refuses"
            )
        return req.noise_multiplier
    reused = state.reused_noise(req.run_id, req.sample_rate, req.steps)
    if reused is not None:
        return max(reused, policy.min_noise_multiplier)
    left = max(1, req.num_rounds - req.round + 1)
    targets = [
        (state.history(), policy.max_epsilon, left),
        (state.history(req.run_id), policy.per_run, left),
        ([], policy.per_round, 1),
    ]
    sigmas = []
    for history, target, rounds in dict.fromkeys((tuple(h), t, n) for h, t, n in targets):
        sigmas.append(
            calibrate_noise(
                history=list(history),
                target_epsilon=target,
                delta=policy.delta,
                sample_rate=req.sample_rate,
                steps=req.steps,
                rounds=rounds,
                accountant=policy.accountant,
            )
        )
    return max(*sigmas, policy.min_noise_multiplier)


def admit(
    tx: Transaction, policy: BudgetPolicy, req: RoundRequest, *, data_fingerprint: str
) -> tuple[Grant, Reserve | Release]:
    """Decide inside ``tx`` and write the outcome; a refusal is recorded, then raised."""
    try:
        grant = decide(tx.state, policy, req)
    except Refused as exc:
        tx.refuse(round=req.round, run_id=req.run_id, reason=str(exc), **exc.details)
        raise
    except BudgetExceededError as exc:  # calibration found no noise that fits
        tx.refuse(round=req.round, run_id=req.run_id, reason=str(exc))
        raise
    if not grant.private:
        reason = "the coordinator asked for a non-private round and the site policy allows it"
        return grant, tx.release_round(
            round=req.round, run_id=req.run_id, data_fingerprint=data_fingerprint, reason=reason,
            train_kind=req.train_kind,
        )  # fmt: skip
    entry = tx.reserve(
        round=req.round,
        run_id=req.run_id,
        step=MechanismStep(grant.noise_multiplier, grant.sample_rate, grant.steps),
        max_grad_norm=grant.max_grad_norm,
        delta=policy.delta,
        max_epsilon=policy.max_epsilon,
        data_fingerprint=data_fingerprint,
        accountant=policy.accountant,
        seeded_noise=req.seeded,
        train_kind=req.train_kind,
    )
    return grant, entry
