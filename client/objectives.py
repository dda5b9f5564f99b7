"""What a record's loss is, for each training kind: one number per privacy unit.

DP-SGD clips one gradient per record, so an objective maps a batch of token rows to one loss per
*record*. A record is one row (an instruction example), several rows (the chunks of a long document;
``group`` says which rows belong together) or, for preference tuning, two rows (the chosen and the
rejected answer of one pair). Every loss depends on its own record's rows alone, which per-record
clipping needs; ``client.train.DPStepper`` sums each record's row gradients before it clips.

``mask`` holds token roles (``client.tokens``): every non-pad token is read, and the loss covers the
positions that predict a ``TARGET`` token (a 0/1 mask: every real token).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from client.tokens import PAD, TARGET


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's trainable weights (the LoRA layers) live; the batches go there."""
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    return next(model.parameters()).device


def shifted_logits(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits, targets and a 0/1 loss mask, trimmed to the batch's longest row."""
    attend = mask != PAD
    width = int(attend.sum(dim=1).max().item())
    device = model_device(model)
    ids, mask, attend = ids[:, :width].to(device), mask[:, :width].to(device), attend[:, :width].to(device)
    logits = model(input_ids=ids, attention_mask=attend.long()).logits[:, :-1, :]
    return logits, ids[:, 1:], (mask[:, 1:] == TARGET).to(logits.dtype)


def _token_nll(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each position's cross-entropy, zero where it predicts no target token (``[rows, width]``)."""
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
    ).view_as(valid)
    return tok * valid


def _sequence_mean_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each row over its target positions (shape ``[rows]``)."""
    return _token_nll(logits, target, valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def row_nll(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed target-token cross-entropy and its number of target tokens (``[rows]`` each)."""
    logits, target, valid = shifted_logits(model, ids, mask)
    return _token_nll(logits, target, valid).sum(dim=1), valid.sum(dim=1)


def per_sample_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each row over its own target tokens (shape ``[rows]``)."""
    return _sequence_mean_loss(*shifted_logits(model, ids, mask))


def group_sum(values: torch.Tensor, group: torch.Tensor, records: int) -> torch.Tensor:
    """``values`` of rows summed per record (``group[row]`` is the row's record, ``0..records-1``)."""
    return values.new_zeros((records, *values.shape[1:])).index_add_(0, group.to(values.device), values)


def records_of(group: torch.Tensor | None, rows: int) -> int:
    """How many records ``rows`` rows hold (one each without ``group``)."""
    return rows if group is None or rows == 0 else int(group.max()) + 1


class Objective(Protocol):
    """A training kind's loss: one loss per record of the batch (``[records]``)."""

    def __call__(
        self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None
    ) -> torch.Tensor: ...


def token_mean(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None = None
) -> torch.Tensor:
    """Instruction tuning and continued pretraining: each record's mean next-token loss over its
    target tokens, across all of its rows (the chunks of a long document count as one record)."""
    if group is None:
        return per_sample_loss(model, ids, mask)
    nll, count = row_nll(model, ids, mask)
    records = records_of(group, ids.size(0))
    return group_sum(nll, group, records) / group_sum(count, group, records).clamp(min=1.0)


class SequenceLoss(torch.nn.Module):
    """``per_sample_loss`` as a criterion on ``(logits, target, valid)`` for Opacus ghost clipping.

    Opacus's ``DPLossFastGradientClipping`` switches ``reduction`` to ``"none"`` to get
    one loss per record (here: per row), then reduces it itself.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-row losses (``reduction="none"``) or their mean / sum."""
        loss = _sequence_mean_loss(logits, target, valid)
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under ``model`` (PEFT, Opacus) computes logits at chosen positions only."""
    inner: Any = _base_of(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _eval_row_nll(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`row_nll`'s sums (float64) with logits only where a target token is predicted.

    The head and the cross-entropy, over the whole vocabulary, are most of a small model's forward;
    an instruction record's prompt (most of its tokens) predicts nothing that is scored.
    """
    if not _takes_logits_to_keep(model):
        return row_nll(model, ids, mask)[0].double()
    attend = mask != PAD
    width = int(attend.sum(dim=1).max().item())
    device = model_device(model)
    ids, mask, attend = ids[:, :width].to(device), mask[:, :width].to(device), attend[:, :width].to(device)
    keep = torch.zeros_like(attend)
    keep[:, :-1] = mask[:, 1:] == TARGET  # position p predicts token p + 1
    out = torch.zeros(ids.size(0), dtype=torch.float64, device=device)
    if not bool(keep.any()):
        return out
    logits = model(input_ids=ids, attention_mask=attend.long(), logits_to_keep=keep, use_cache=False).logits
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), ids[:, 1:][keep[:, :-1]], reduction="none"
    )
    return out.index_add_(0, keep.nonzero()[:, 0], tok.double())


def _by_length(mask: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Row indices in batches of similar length (less padding in each batch's forward)."""
    order = torch.argsort((mask != PAD).sum(dim=1), descending=True, stable=True)
    return list(order.split(batch))


@torch.no_grad()
def record_nll(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    group: torch.Tensor | None = None,
    batch: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each held-out record's summed target-token loss and its target-token count (``[records]``,
    float64), batched, without gradients, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        nll = torch.zeros(ids.size(0), dtype=torch.float64)
        for rows in _by_length(mask, batch):
            nll[rows] = _eval_row_nll(model, ids[rows], mask[rows]).cpu()
    finally:
        model.train(was_training)
    count = (mask[:, 1:] == TARGET).sum(dim=1).double()
    if group is None:
        return nll, count
    records = records_of(group, ids.size(0))
    return group_sum(nll, group, records), group_sum(count, group, records)


def evaluate_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 32) -> float:
    """Target-token-weighted mean next-token loss over a held-out set (prompts excluded)."""
    nll, count = record_nll(model, ids, mask, batch=batch)
    return float(nll.sum()) / max(float(count.sum()), 1.0)


def _pair_rows(group: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of each pair's chosen and rejected answer (two adjacent rows per pair)."""
    if group is None or rows % 2 or not torch.equal(group.cpu(), torch.arange(rows) // 2):
        raise ValueError("preference pairs need exactly two rows per record: chosen, then rejected")
    chosen = torch.arange(0, rows, 2)
    return chosen, chosen + 1


def _base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model inside Opacus's wrapper (its ``disable_adapter`` gives the reference model)."""
    return getattr(model, "_module", model)


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its target tokens (the answer, given the prompt)."""
    return -row_nll(model, ids, mask)[0]


def reference_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`sequence_logps` of the base model: the same model with its LoRA adapter disabled."""
    with torch.no_grad(), _base_of(model).disable_adapter():  # type: ignore[operator]
        return sequence_logps(_base_of(model), ids, mask)


def dpo_margins(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None, beta: float
) -> torch.Tensor:
    """Each pair's reward margin ``beta * ((logp_c - ref_c) - (logp_r - ref_r))`` (``[pairs]``)."""
    chosen, rejected = _pair_rows(group, ids.size(0))
    ratio = (sequence_logps(model, ids, mask) - reference_logps(model, ids, mask)).to(torch.float32)
    return beta * (ratio[chosen] - ratio[rejected])


@dataclass(frozen=True)
class DPO:
    """Direct preference optimisation: ``-log sigmoid(margin)`` per pair; the pair is the privacy unit.

    The reference is the base model itself (the adapter disabled), so it needs no second copy.
    """

    beta: float = 0.1

    def __call__(
        self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None
    ) -> torch.Tensor:
        """Each pair's DPO loss (``[pairs]``)."""
        return torch.nn.functional.softplus(-dpo_margins(model, ids, mask, group, self.beta))


@torch.no_grad()
def pair_margins(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, beta: float, batch: int = 32
) -> torch.Tensor:
    """Each held-out pair's reward margin (rows: chosen, rejected, ...), batched, in eval mode."""
    _pair_rows(torch.arange(ids.size(0)) // 2, ids.size(0))  # two rows per pair, or ValueError
    tuned = record_nll(model, ids, mask, batch=2 * batch)[0]
    with _base_of(model).disable_adapter():  # type: ignore[operator]
        ref = record_nll(_base_of(model), ids, mask, batch=2 * batch)[0]
    ratio = ref - tuned  # log-prob of the tuned model minus the reference's
    return beta * (ratio[0::2] - ratio[1::2])


def evaluate_pairs(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, beta: float, batch: int = 32
) -> dict[str, float]:
    """Held-out DPO loss, mean reward margin and accuracy (share of pairs with margin > 0)."""
    m = pair_margins(model, ids, mask, beta, batch)
    return {
        "eval-loss": float(torch.nn.functional.softplus(-m).mean()),
        "reward-margin": float(m.mean()),
        "reward-accuracy": float((m > 0).double().mean()),
    }
