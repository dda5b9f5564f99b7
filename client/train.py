"""Local DP-LoRA training: one explicit loop over Opacus's building blocks.

Opacus pieces used directly (no ``PrivacyEngine``) because the site's persistent
ledger is the accountant (``privacy.ledger``) and both randomness sources -- Poisson
sampling and Gaussian noise -- must come from generators seeded from the OS, never
from torch's default generator (whose seed is a fixed constant in a fresh process).
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)


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
    """What one round of local training did."""

    steps: int
    empty_batches: int
    first_loss: float
    mean_loss: float
    last_loss: float


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from the OS, or from ``seed`` (testing only: not private)."""
    gen = torch.Generator()
    if seed is None:
        gen.manual_seed(secrets.randbits(63))
    else:
        log.warning("DP noise seeded with %d: reproducible, therefore NOT PRIVATE", seed)
        gen.manual_seed(seed)
    return gen


def per_sample_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sequence over its own tokens (shape ``[batch]``).

    Each record's loss depends on that record alone, which per-sample clipping needs.
    """
    width = int(mask.sum(dim=1).max().item())
    ids, mask = ids[:, :width], mask[:, :width]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :]
    target = ids[:, 1:]
    valid = mask[:, 1:].to(logits.dtype)
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
    ).view_as(valid)
    return (tok * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 32) -> float:
    """Token-weighted mean next-token loss over a held-out set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, ids.size(0), batch):
        b_ids, b_mask = ids[i : i + batch], mask[i : i + batch]
        tokens = (b_mask[:, 1:].sum(dim=1)).to(torch.float32)
        total += float((per_sample_loss(model, b_ids, b_mask) * tokens).sum())
        count += float(tokens.sum())
    model.train(was_training)
    return total / max(count, 1.0)


def train_dp(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    plan: DPPlan,
    *,
    learning_rate: float,
    seed: int | None = None,
) -> TrainStats:
    """Run ``plan.steps`` DP-SGD steps (Poisson sampling, per-sample clipping, Gaussian noise).

    Only parameters with ``requires_grad`` (the LoRA weights) are trained. Every sampled
    step counts in the plan -- including the rare empty Poisson batch, which is skipped
    without touching the model -- so the ledger's ``steps`` is exact.
    """
    model.train()
    sample_gen = make_generator(seed)
    noise_gen = make_generator(None if seed is None else seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=noise_gen,
    )
    loader = DPDataLoader(TensorDataset(ids, mask), sample_rate=plan.sample_rate, generator=sample_gen)
    losses: list[float] = []
    empty = 0
    done = 0
    with warnings.catch_warnings():
        # Opacus's per-layer backward hooks fire on frozen layers whose inputs need no gradient;
        # torch warns about that on every step although the per-sample gradients are correct.
        warnings.filterwarnings("ignore", message=r"Full backward hook is firing", category=UserWarning)
        try:
            while done < plan.steps:
                for b_ids, b_mask in loader:
                    if done >= plan.steps:
                        break
                    done += 1
                    if b_ids.size(0) == 0:
                        empty += 1
                        continue
                    loss = per_sample_loss(gsm, b_ids, b_mask).mean()
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
        finally:
            gsm._close()  # remove Opacus hooks so the cached model can be reused next round
            for p in params:
                p.grad = None
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None
    if not losses:
        losses = [float("nan")]
    return TrainStats(
        steps=done,
        empty_batches=empty,
        first_loss=losses[0],
        mean_loss=sum(losses) / len(losses),
        last_loss=losses[-1],
    )
