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
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch.utils.data import TensorDataset

from client.tokens import PAD, TARGET

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


def _shifted_logits(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits, targets and a 0/1 loss mask, trimmed to the batch's longest record.

    ``mask`` holds token roles (``client.tokens``): every non-pad token is attended, and the loss
    covers the positions that predict a ``TARGET`` token (a 0/1 mask: every real token).
    """
    attend = mask != PAD
    width = int(attend.sum(dim=1).max().item())
    device = model_device(model)
    ids, mask, attend = ids[:, :width].to(device), mask[:, :width].to(device), attend[:, :width].to(device)
    logits = model(input_ids=ids, attention_mask=attend.long()).logits[:, :-1, :]
    return logits, ids[:, 1:], (mask[:, 1:] == TARGET).to(logits.dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's trainable weights (the LoRA layers) live; the batches go there."""
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    return next(model.parameters()).device


def _sequence_mean_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each sequence over its valid positions (shape ``[batch]``)."""
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
    ).view_as(valid)
    return (tok * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def per_sample_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sequence over its own target tokens (shape ``[batch]``).

    Each record's loss depends on that record alone, which per-sample clipping needs; ``mask`` holds
    token roles (``client.tokens``): a prompt's tokens are read, never learned.
    """
    return _sequence_mean_loss(*_shifted_logits(model, ids, mask))


class SequenceLoss(torch.nn.Module):
    """``per_sample_loss`` as a criterion on ``(logits, target, valid)`` for Opacus ghost clipping.

    Opacus's ``DPLossFastGradientClipping`` switches ``reduction`` to ``"none"`` to get
    one loss per record (here: per sequence), then reduces it itself.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-sequence losses (``reduction="none"``) or their mean / sum."""
        loss = _sequence_mean_loss(logits, target, valid)
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 32) -> float:
    """Target-token-weighted mean next-token loss over a held-out set (prompts excluded)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, ids.size(0), batch):
        b_ids, b_mask = ids[i : i + batch], mask[i : i + batch]
        tokens = (b_mask[:, 1:] == TARGET).sum(dim=1).to(torch.float32)
        total += float((per_sample_loss(model, b_ids, b_mask).float().cpu() * tokens).sum())
        count += float(tokens.sum())
    model.train(was_training)
    return total / max(count, 1.0)


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
        world_size: int = 1,
    ) -> None:
        if mode not in DP_MODES:
            raise ValueError(f"unknown DP mode {mode!r}: use one of {', '.join(DP_MODES)}")
        if world_size > 1 and mode == "ghost":
            raise ValueError("ghost clipping is not wired for several ranks: use mode 'hooks' or 'functorch'")
        self.mode: DPMode = mode
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

    def backward(self, ids: torch.Tensor, mask: torch.Tensor) -> float:
        """Forward and backward of one non-empty batch, leaving clipped material for :meth:`update`.

        Returns the batch's mean per-record loss.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
            if self._criterion is not None:
                ghost_loss = self._criterion(*_shifted_logits(self.module, ids, mask))
                ghost_loss.backward()  # two passes: per-record norms, then the clipped sum
                self._check_per_record(ids.size(0), "_norm_sample")
                return float(ghost_loss.detach())
            losses = per_sample_loss(self.module, ids, mask)
            losses.sum().backward()
        self._check_per_record(ids.size(0))
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

    def step(self, ids: torch.Tensor, mask: torch.Tensor) -> float:
        """One full DP-SGD step on a non-empty batch; returns its mean per-record loss."""
        loss = self.backward(ids, mask)
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
    mode: DPMode = DEFAULT_MODE,
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
        Token ids and attention mask of the site's training records, ``[n, seq_len]``.
    plan
        The round's DP mechanism.
    learning_rate
        AdamW learning rate.
    seed
        ``None`` (production): sampling and noise from OS entropy. An integer makes the run
        reproducible and is logged as NOT PRIVATE.
    mode
        Opacus per-sample gradient mode; see :class:`DPStepper`.

    Returns
    -------
    TrainStats
        Steps taken (empty batches included) and the loss trajectory.
    """
    model.train()
    sample_gen = make_generator(seed)
    noise_gen = make_generator(None if seed is None else seed + 1, model_device(model))
    stepper = DPStepper(model, plan, learning_rate=learning_rate, noise_generator=noise_gen, mode=mode)
    return run_steps(stepper, poisson_batches(ids, mask, plan, sample_gen))


def poisson_batches(
    ids: torch.Tensor, mask: torch.Tensor, plan: DPPlan, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``plan.steps`` Poisson batches of the records (each one in with ``plan.sample_rate``); some empty.

    No records at all (a rank's empty shard) gives ``plan.steps`` empty batches.
    """
    if ids.size(0) == 0:
        for _ in range(plan.steps):
            yield ids, mask
        return
    loader = DPDataLoader(TensorDataset(ids, mask), sample_rate=plan.sample_rate, generator=generator)
    done = 0
    while done < plan.steps:
        for b_ids, b_mask in loader:
            if done >= plan.steps:
                return
            done += 1
            yield b_ids, b_mask


def run_steps(stepper: DPStepper, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> TrainStats:
    """One DP-SGD step per batch -- the noise alone for an empty one -- then close ``stepper``."""
    losses: list[float] = []
    empty = done = 0
    try:
        for b_ids, b_mask in batches:
            done += 1
            if b_ids.size(0) == 0:
                empty += 1
                stepper.empty_step()
                continue
            losses.append(stepper.step(b_ids, b_mask))
    finally:
        stepper.close()
    return TrainStats(
        steps=done,
        empty_batches=empty,
        first_loss=losses[0] if losses else None,
        mean_loss=sum(losses) / len(losses) if losses else None,
        last_loss=losses[-1] if losses else None,
    )
