"""Local DP-LoRA training: one explicit loop over Opacus's building blocks.

Opacus pieces used directly (no ``PrivacyEngine``) because the site's persistent
ledger is the accountant (``privacy.ledger``) and both randomness sources -- Poisson
sampling and Gaussian noise -- must come from generators seeded from the OS, never
from torch's default generator (whose seed is a fixed constant in a fresh process).

Per-sample gradients are computed in Opacus's ``hooks`` mode by default: only modules
that own trainable parameters -- the LoRA ``lora_A`` / ``lora_B`` linears -- get hooks,
and their per-sample gradients are one small batched matmul each. Measured against
``functorch`` and ``ghost`` clipping in ``docs/performance.md`` (``bench/dp_overhead.py``).
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
import torch.distributed as dist
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch.utils.data import TensorDataset

from client.objectives import (
    Objective,
    SequenceLoss,
    evaluate_loss,
    group_sum,
    model_device,
    per_sample_loss,
    records_of,
    shifted_logits,
    token_mean,
)
from client.tokens import take_records

__all__ = [
    "DP_MODES", "DPPlan", "DPStepper", "TrainStats", "TrainStep", "evaluate_loss", "make_generator",
    "model_device", "per_sample_loss", "poisson_batches", "run_steps", "train_dp",
]  # fmt: skip

log = logging.getLogger(__name__)

DPMode = Literal["hooks", "functorch", "ghost"]
"""How per-sample gradients are clipped: Opacus hooks, functorch (vmap) or ghost clipping."""

DP_MODES: tuple[str, ...] = get_args(DPMode)
DEFAULT_MODE: DPMode = "hooks"

# Opacus's full backward hooks on a LoRA layer whose input needs no gradient (the first
# adapted layer: embeddings are frozen) make torch warn on every step although the
# per-sample gradients are correct.
_HOOK_WARNING = r"Full backward hook is firing when gradients are computed with respect to module outputs"


@dataclass(frozen=True)
class DPPlan:
    """The mechanism of one round: what the ledger records and the accountant composes."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    expected_batch_size: int


@dataclass(frozen=True)
class TrainStats:
    """What one round of local training did (losses over the non-empty batches; ``None`` if none)."""

    steps: int
    empty_batches: int
    first_loss: float | None
    mean_loss: float | None
    last_loss: float | None

    @property
    def batches(self) -> int:
        """Steps whose Poisson batch held at least one record."""
        return self.steps - self.empty_batches


class TrainStep(Protocol):
    """The site recipe's train step: train `model` on the records under `plan` (training kinds plug in)."""

    def __call__(
        self,
        model: torch.nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        plan: DPPlan,
        *,
        learning_rate: float,
        seed: int | None = None,
        group: torch.Tensor | None = None,
        objective: Objective = token_mean,
    ) -> TrainStats: ...


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the OS, or from ``seed`` (testing only: not private)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.manual_seed(secrets.randbits(63))
    else:
        log.warning("DP noise seeded with %d: reproducible, therefore NOT PRIVATE", seed)
        gen.manual_seed(seed)
    return gen


class DPStepper:
    """One DP-SGD update per call on a given batch: per-sample clip, Gaussian noise, AdamW.

    Wraps ``model`` with the Opacus module of ``mode`` until :meth:`close`; the model's
    ``requires_grad`` parameters (the LoRA weights) are the only ones trained.

    Parameters
    ----------
    model
        The LoRA model, in training mode.
    plan
        Noise multiplier, clip norm and expected (Poisson) batch size.
    learning_rate
        AdamW learning rate (no weight decay).
    noise_generator
        Source of the Gaussian noise; from :func:`make_generator`.
    mode
        ``"hooks"`` (default, fastest for LoRA here), ``"functorch"`` or ``"ghost"``.
    objective
        One loss per record (``client.objectives``); a record may span several rows (``group``).
    world_size
        Ranks training one logical batch together (``client.distributed``): above 1, Opacus's
        ``DistributedDPOptimizer`` sums the ranks' clipped sums and only rank 0 adds noise, so the
        step is one Gaussian draw on the whole batch's clipped sum, as on one device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: DPPlan,
        *,
        learning_rate: float,
        noise_generator: torch.Generator,
        mode: DPMode = DEFAULT_MODE,
        objective: Objective = token_mean,
        world_size: int = 1,
    ) -> None:
        if mode not in DP_MODES:
            raise ValueError(f"unknown DP mode {mode!r}: use one of {', '.join(DP_MODES)}")
        if world_size > 1 and mode == "ghost":
            raise ValueError("ghost clipping is not wired for several ranks: use mode 'hooks' or 'functorch'")
        self.mode: DPMode = mode
        self.objective = objective
        self.params = [p for p in model.parameters() if p.requires_grad]
        base_opt = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=0.0)
        self._criterion: DPLossFastGradientClipping | None = None
        self.module: GradSampleModule | GradSampleModuleFastGradientClipping
        self.optimizer: DPOptimizer
        noise: dict[str, Any] = {
            "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm,
            # per rank: the all-reduce divides the sum by the world size once more
            "expected_batch_size": plan.expected_batch_size / world_size,
            "loss_reduction": "mean",
            "generator": noise_generator,
        }
        if mode == "ghost":
            self.module = GradSampleModuleFastGradientClipping(
                model,
                batch_first=True,
                loss_reduction="mean",
                max_grad_norm=plan.max_grad_norm,
                use_ghost_clipping=True,
            )
            ghost_opt = DPOptimizerFastGradientClipping(base_opt, **noise)
            self._criterion = DPLossFastGradientClipping(self.module, ghost_opt, SequenceLoss(), "mean")
            self.optimizer = ghost_opt
        else:
            # The backward pass runs on the SUM of per-record losses, so the hooks see each record's
            # own gradient and skip Opacus's rescaling of every hooked layer's output gradient by the
            # batch size ("mean"); the optimizer still divides the noisy clipped sum by the expected
            # batch size ("mean"), so the update is that of the mean loss.
            self.module = GradSampleModule(
                model, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch"
            )
            dp_opt = DistributedDPOptimizer if world_size > 1 else DPOptimizer
            self.optimizer = dp_opt(base_opt, **noise)

    def backward(self, ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None = None) -> float:
        """Forward and backward of one non-empty batch, leaving clipped material for :meth:`update`.

        ``group[row]`` is the record of each row (``None``: one row per record). Each record's row
        gradients are summed into its one per-record gradient before the optimizer clips it.
        Returns the batch's mean per-record loss.
        """
        records = records_of(group, ids.size(0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
            if self._criterion is not None:
                if records != ids.size(0) or self.objective is not token_mean:
                    raise ValueError(
                        "ghost clipping clips one row at a time: records of several rows (long documents, "
                        "preference pairs) need mode 'hooks' or 'functorch'"
                    )
                ghost_loss = self._criterion(*shifted_logits(self.module, ids, mask))
                ghost_loss.backward()  # two passes: per-record norms, then the clipped sum
                self._check_per_record(ids.size(0), "_norm_sample")
                return float(ghost_loss.detach())
            losses = self.objective(self.module, ids, mask, group)
            losses.sum().backward()
        self._check_per_record(ids.size(0))
        if group is not None and records != ids.size(0):
            for p in self.params:  # the record is the privacy unit: its rows' gradients, summed
                p.grad_sample = group_sum(p.grad_sample, group, records)  # type: ignore[attr-defined]
        return float(losses.detach().mean())

    def _check_per_record(self, batch: int, attr: str = "grad_sample") -> None:
        """Every trained tensor holds one gradient (norm) per record, or the step stops, untrained."""
        missing = [
            p for p in self.params if getattr(p, attr, None) is None or getattr(p, attr).shape[0] != batch
        ]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(self.params)} LoRA tensors have no per-record gradients after "
                "backward: Opacus's hooks did not fire (non-reentrant gradient checkpointing does this); "
                "the step is refused rather than trained without per-record clipping"
            )

    def update(self) -> None:
        """Clip (hooks / functorch), add noise, take the AdamW step, clear gradients."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def empty_step(self) -> None:
        """The DP-SGD step of an empty Poisson batch: no record, so the update is the noise alone.

        Skipping it instead would make the number of updates depend on whether a record was
        sampled, which the privacy analysis of Poisson-sampled DP-SGD does not allow.
        """
        for p in self.params:
            if self._criterion is not None:  # ghost clipping: the clipped sum lives in p.grad
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
        self.update()

    def step(self, ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None = None) -> float:
        """One full DP-SGD step on a non-empty batch; returns its mean per-record loss."""
        loss = self.backward(ids, mask, group)
        self.update()
        return loss

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample state so the model can be reused (idempotent)."""
        if hasattr(self.module, "autograd_grad_sample_hooks"):
            self.module._close()
        for p in self.params:
            p.grad = None
            if hasattr(p, "grad_sample"):
                p.grad_sample = None


def train_dp(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    plan: DPPlan,
    *,
    learning_rate: float,
    seed: int | None = None,
    group: torch.Tensor | None = None,
    objective: Objective = token_mean,
    mode: DPMode = DEFAULT_MODE,
    distributed: bool = False,
) -> TrainStats:
    """Run ``plan.steps`` DP-SGD steps (Poisson sampling, per-sample clipping, Gaussian noise).

    Only parameters with ``requires_grad`` (the LoRA weights) are trained. Every sampled
    step counts in the plan -- including an empty Poisson batch, whose step applies the
    noise alone (:meth:`DPStepper.empty_step`) -- so the ledger's ``steps`` is exact.

    Parameters
    ----------
    model
        LoRA model; put in training mode here.
    ids, mask
        Token ids and roles (``client.tokens``) of the site's training rows, ``[rows, seq_len]``.
    plan
        The round's DP mechanism.
    learning_rate
        AdamW learning rate.
    seed
        ``None`` (production): sampling and noise from OS entropy. An integer makes the run
        reproducible and is logged as NOT PRIVATE.
    group
        The record of each row (rows of a record adjacent, records ``0..n-1``); ``None``: a row
        is a record. Poisson sampling draws records, and a record's rows train together.
    objective
        The training kind's per-record loss (``client.objectives``).
    mode
        Opacus per-sample gradient mode; see :class:`DPStepper`.
    distributed
        Called by every rank of a ``torch.distributed`` group with its own shard of the records
        (``client.distributed``): rank 0's trainable tensors are every rank's start, each rank
        Poisson-samples its shard, and the step is the one-process step on the union of the ranks'
        batches (the clipped sums added, one noise draw on rank 0, which with ``seed`` is the
        one-process draw). Every rank's model ends with the same weights.

    Returns
    -------
    TrainStats
        Steps taken (empty batches included) and the loss trajectory.
    """
    model.train()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if distributed:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
    sample_gen = make_generator(None if seed is None else seed + 7919 * rank)
    noise_gen = make_generator(None if seed is None else seed + 1, model_device(model))
    stepper = DPStepper(
        model, plan, learning_rate=learning_rate, noise_generator=noise_gen, mode=mode, objective=objective,
        world_size=world,
    )  # fmt: skip
    return run_steps(stepper, poisson_batches(ids, mask, plan, sample_gen, group))


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""Token ids, roles and the record of each row (``None``: one row per record)."""


def poisson_batches(
    ids: torch.Tensor,
    mask: torch.Tensor,
    plan: DPPlan,
    generator: torch.Generator,
    group: torch.Tensor | None = None,
) -> Iterator[Batch]:
    """``plan.steps`` Poisson batches of the records (each one in with ``plan.sample_rate``); some empty.

    With ``group`` the records are drawn and each brings all of its rows. No records at all (a
    rank's empty shard) gives ``plan.steps`` empty batches.
    """
    if ids.size(0) == 0:
        for _ in range(plan.steps):
            yield ids, mask, group
        return
    records = torch.arange(records_of(group, ids.size(0)))
    loader = DPDataLoader(TensorDataset(records), sample_rate=plan.sample_rate, generator=generator)
    done = 0
    while done < plan.steps:
        for (chosen,) in loader:
            if done >= plan.steps:
                return
            done += 1
            if group is None:
                yield ids[chosen], mask[chosen], None
            else:
                yield take_records(ids, mask, group, chosen)


def run_steps(stepper: DPStepper, batches: Iterable[Batch]) -> TrainStats:
    """One DP-SGD step per batch -- the noise alone for an empty one -- then close ``stepper``."""
    losses: list[float] = []
    empty = done = 0
    try:
        for b_ids, b_mask, b_group in batches:
            done += 1
            if b_ids.size(0) == 0:
                empty += 1
                stepper.empty_step()
                continue
            losses.append(stepper.step(b_ids, b_mask, b_group))
    finally:
        stepper.close()
    return TrainStats(
        steps=done,
        empty_batches=empty,
        first_loss=losses[0] if losses else None,
        mean_loss=sum(losses) / len(losses) if losses else None,
        last_loss=losses[-1] if losses else None,
    )
