"""Continued pretraining on long documents: a record's chunks are one privacy unit (one clip)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from client.objectives import row_nll, token_mean
from client.tokens import CONTEXT, TARGET, Example, tokenize_examples
from client.train import DPPlan, DPStepper, train_dp
from common.modeling import load_tokenizer
from tests.client.lora import lora_model

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_LEN = 24
DOCS = [
    Example("", "Discharge summary. " + "The patient walked the hall twice and ate well. " * 6),
    Example("", "Short note: stable overnight."),
    Example("", "Maintenance log: pump seal replaced, pressure nominal, valve checked. " * 3),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def docs(tokenizer: Any) -> Any:
    return tokenize_examples(DOCS, tokenizer, MAX_LEN)


def test_a_long_document_becomes_chunks_that_predict_each_token_once(tokenizer: Any, docs: Any) -> None:
    whole = tokenizer(DOCS[0].response)["input_ids"] + [tokenizer.eos_token_id]
    rows = (docs.group == 0).nonzero().flatten().tolist()
    assert len(rows) > 2 and docs.records == 3 and docs.chunked
    predicted: list[int] = []
    for r in rows:
        roles = docs.roles[r].tolist()
        assert roles[0] == CONTEXT and TARGET in roles
        predicted += [int(t) for t, role in zip(docs.ids[r], roles, strict=True) if role == TARGET]
    assert predicted == whole[1:]  # every token after the first, exactly once, in order
    assert docs.group.tolist() == sorted(docs.group.tolist())  # a record's rows are adjacent
    cut = tokenize_examples(DOCS, tokenizer, MAX_LEN, chunk=False)
    assert not cut.chunked and cut.ids.size(0) == 3


def _brute_force(model: Any, docs: Any) -> torch.Tensor:
    """Each record's gradient from its own rows alone: mean loss over all of its chunks' tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for rec in range(docs.records):
        rows = docs.group == rec
        nll, count = row_nll(model, docs.ids[rows], docs.roles[rows])
        grads = torch.autograd.grad(nll.sum() / count.sum(), params)
        out.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(out)


def test_a_chunked_record_is_clipped_once_on_its_summed_chunk_gradients(tiny_model: Path, docs: Any) -> None:
    model = lora_model(tiny_model)
    params = [p for p in model.parameters() if p.requires_grad]
    brute = _brute_force(model, docs)
    norms = brute.norm(dim=1)
    clip, expected = float(norms.min()) * 0.5, 2  # every record is clipped
    want = (brute * (clip / norms)[:, None]).sum(0) / expected
    stepper = DPStepper(
        model, DPPlan(0.0, 0.5, 1, clip, expected), learning_rate=0.0, noise_generator=torch.Generator()
    )
    try:
        loss = stepper.backward(docs.ids, docs.roles, docs.group)
        per_record = torch.cat([p.grad_sample.reshape(docs.records, -1) for p in params], dim=1)
        stepper.optimizer.pre_step()
        got = torch.cat([p.grad.flatten() for p in params])
    finally:
        stepper.close()
    assert loss == pytest.approx(float(token_mean(model, docs.ids, docs.roles, docs.group).mean()), rel=1e-5)
    assert float((per_record - brute).norm() / brute.norm()) < 1e-3
    assert float((got - want).norm() / want.norm()) < 1e-3
    # what one record contributes is at most the clip norm, chunks and all
    first = docs.group == 0
    one = DPStepper(model, DPPlan(0.0, 0.5, 1, clip, 1), learning_rate=0.0, noise_generator=torch.Generator())
    try:
        one.backward(docs.ids[first], docs.roles[first], torch.zeros(int(first.sum()), dtype=torch.long))
        one.optimizer.pre_step()
        alone = torch.cat([p.grad.flatten() for p in params])
    finally:
        one.close()
    assert float(alone.norm()) <= clip * (1 + 1e-5)
    assert float(alone.norm()) == pytest.approx(clip, rel=1e-4)
    # clipping each chunk on its own instead would let the one record weigh more than one clip
    rows = first.nonzero().flatten().tolist()
    per_chunk = []
    for r in rows:
        nll, count = row_nll(model, docs.ids[r : r + 1], docs.roles[r : r + 1])
        g = torch.cat([x.flatten() for x in torch.autograd.grad(nll.sum() / count.sum(), params)])
        per_chunk.append(g * min(1.0, clip / float(g.norm())))
    assert float(torch.stack(per_chunk).sum(0).norm()) > clip * 1.05


def test_sampling_draws_records_with_all_their_chunks(tiny_model: Path, docs: Any) -> None:
    model = lora_model(tiny_model)
    plan = DPPlan(1.0, 0.5, 6, 1.0, 2)
    stats = train_dp(model, docs.ids, docs.roles, plan, learning_rate=0.01, seed=3, group=docs.group)
    assert stats.steps == 6 and stats.mean_loss is not None and stats.mean_loss > 0
    with pytest.raises(ValueError, match="ghost clipping"):
        train_dp(
            model, docs.ids, docs.roles, plan, learning_rate=0.01, seed=3, group=docs.group, mode="ghost"
        )
