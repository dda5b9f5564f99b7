"""Preference tuning (DPO) under DP: the pair is the privacy unit, the reference is the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from client.compute import load_base
from client.objectives import DPO, dpo_margins, reference_logps, sequence_logps
from client.tokens import CONTEXT, TARGET, Example, tokenize_examples
from client.train import DPPlan, DPStepper
from common.modeling import load_tokenizer
from embedded.synthdata import generate_site_pairs
from tests.client.hostile import Site, reason, status
from tests.client.lora import SETTINGS, lora_model

pytestmark = pytest.mark.usefixtures("one_thread")
BETA = 0.5
PAIRS = [
    Example("Summarize: chest pain, troponin normal.", "Chest pain; troponin normal.", "", "Patient seen."),
    Example("List the drugs.", "Aspirin 81 mg; metoprolol 25 mg.", "", "Aspirin 325 mg; warfarin."),
    Example("Next visit?", "In two weeks, 03/09.", "", "See note above for details."),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def pairs(tokenizer: Any) -> Any:
    return tokenize_examples(PAIRS, tokenizer, 48)


def test_a_pair_is_two_rows_chosen_then_rejected_with_the_same_prompt(tokenizer: Any, pairs: Any) -> None:
    assert pairs.ids.size(0) == 6 and pairs.records == 3
    assert pairs.group.tolist() == [0, 0, 1, 1, 2, 2]
    prompt = tokenizer(PAIRS[0].plain_prompt)["input_ids"]
    for row in (0, 1):
        assert pairs.ids[row, : len(prompt)].tolist() == prompt
        assert (pairs.roles[row, : len(prompt)] == CONTEXT).all() and pairs.roles[row, len(prompt)] == TARGET
    chosen = tokenizer(PAIRS[0].response, add_special_tokens=False)["input_ids"]
    assert pairs.ids[0, len(prompt) : len(prompt) + len(chosen)].tolist() == chosen
    too_long = tokenize_examples([Example("Q", "A", "", "word " * 80), PAIRS[0]], tokenizer, 32)
    assert too_long.too_long == (0,) and too_long.records == 1  # a pair whose answer cannot fit is left out


def test_with_the_adapter_disabled_the_reference_is_the_base_model(tiny_model: Path, pairs: Any) -> None:
    compute = SETTINGS["fp32"]
    model = lora_model(tiny_model, compute)  # lora_B is non-zero: the tuned model differs from the base
    base = load_base(tiny_model, compute).eval()
    model.eval()
    with torch.no_grad():
        want = sequence_logps(base, pairs.ids, pairs.roles)
        tuned = sequence_logps(model, pairs.ids, pairs.roles)
    got = reference_logps(model, pairs.ids, pairs.roles)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (tuned - want).abs().max() > 1e-3
    with torch.no_grad():  # the adapter is back on after the reference pass
        torch.testing.assert_close(sequence_logps(model, pairs.ids, pairs.roles), tuned)


def _brute_force(model: Any, pairs: Any) -> torch.Tensor:
    """Each pair's gradient by its own backward pass through the batch's DPO losses (no Opacus)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(pairs.records):  # .backward(): reentrant checkpointing does not support autograd.grad
        model.zero_grad(set_to_none=True)
        DPO(BETA)(model, pairs.ids, pairs.roles, pairs.group)[i].backward()
        out.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


def _alone(model: Any, pairs: Any, ref: torch.Tensor) -> torch.Tensor:
    """Each pair's gradient of -log sigmoid(margin), written out from that pair's two rows alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(pairs.records):
        rows = slice(2 * i, 2 * i + 2)
        lp = sequence_logps(model, pairs.ids[rows], pairs.roles[rows]).float()
        margin = BETA * ((lp[0] - ref[2 * i]) - (lp[1] - ref[2 * i + 1]))
        grads = torch.autograd.grad(-torch.nn.functional.logsigmoid(margin), params)
        out.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(out)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_per_pair_gradients_and_clipped_sum_equal_brute_force(
    tiny_model: Path, pairs: Any, setting: str
) -> None:
    model = lora_model(tiny_model, SETTINGS[setting])
    params = [p for p in model.parameters() if p.requires_grad]
    brute = _brute_force(model, pairs)
    norms = brute.norm(dim=1)
    clip = float(norms.median())
    want = (brute * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / 2
    stepper = DPStepper(
        model, DPPlan(0.0, 0.5, 1, clip, 2), learning_rate=0.0, noise_generator=torch.Generator(),
        objective=DPO(BETA),
    )  # fmt: skip
    try:
        loss = stepper.backward(pairs.ids, pairs.roles, pairs.group)
        per_pair = torch.cat([p.grad_sample.reshape(pairs.records, -1) for p in params], dim=1)
        stepper.optimizer.pre_step()
        got = torch.cat([p.grad.flatten() for p in params])
    finally:
        stepper.close()
    assert (norms > clip * 1.01).any()  # some pairs are clipped
    assert float((per_pair - brute).norm() / brute.norm()) < 1e-3, setting
    assert float((got - want).norm() / want.norm()) < 1e-3, setting
    compute = SETTINGS[setting]
    if compute.dtype == "float32" and not compute.gradient_checkpointing:  # (see test_compute: bf16 rounding)
        alone = _alone(model, pairs, reference_logps(model, pairs.ids, pairs.roles).float())
        assert float((per_pair - alone).norm() / alone.norm()) < 1e-3, setting
    margins = dpo_margins(model, pairs.ids, pairs.roles, pairs.group, BETA)
    assert loss == pytest.approx(float(torch.nn.functional.softplus(-margins).mean()), rel=1e-3)


def test_a_batch_that_is_not_whole_pairs_is_refused(tiny_model: Path, pairs: Any) -> None:
    model = lora_model(tiny_model, SETTINGS["fp32"])
    with pytest.raises(ValueError, match="two rows per record"):
        DPO(BETA)(model, pairs.ids[:3], pairs.roles[:3], torch.tensor([0, 0, 1]))


def test_a_site_trains_its_pairs_and_reports_the_reward_margin(
    tmp_path: Path, hostile_data: Path, tiny_model: Path, start_adapter: ArrayRecord
) -> None:
    rows, _ = generate_site_pairs(0, 40, seed=4)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    site = Site(tmp_path / "site", hostile_data, tiny_model)
    site.policy.write_text(site.policy.read_text().replace('dpo-path = ""', f'dpo-path = "{data}"'), "utf-8")
    ask = site.request_record(1) | {"train-kind": "dpo", "max-seq-len": 128}
    reply = site.ask_record(start_adapter, ask)
    assert status(reply) == "trained", reason(reply)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["reward-margin-before"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the model is the base
    assert metrics["eval-loss-before"] == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert [e.get("train_kind") for e in site.entries() if e["kind"] == "reserve"] == ["dpo"]
    assert (site.root / "state" / "scrub-report-dpo.json").is_file()
