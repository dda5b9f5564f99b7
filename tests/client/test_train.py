"""Local DP-SGD training: learning, per-record clipping, noise seeding, empty Poisson batches."""

from __future__ import annotations

import copy
import logging
from typing import cast

import pytest
import torch

from client.train import (
    DP_MODES,
    DPMode,
    DPPlan,
    DPStepper,
    evaluate_loss,
    per_sample_loss,
    train_dp,
)
from common.config import LoraSpec
from common.modeling import make_peft_model

SEQ = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_model() -> torch.nn.Module:
    """A randomly initialised micro Llama (no build step) with LoRA on q_proj / v_proj."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = make_peft_model(LlamaForCausalLM(cfg), LoraSpec(rank=4, alpha=8, targets="q_proj,v_proj"))
    model.train()
    return model


def _toy_data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable records: each repeats a 4-token cycle; lengths vary, right-padded with 0."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(n, SEQ, dtype=torch.long)
    mask = torch.zeros(n, SEQ, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(12, SEQ + 1, (1,), generator=gen))
        start = int(torch.randint(0, 4, (1,), generator=gen))
        ids[i, :length] = 10 + (torch.arange(start, start + length) % 4)
        mask[i, :length] = 1
    return ids, mask


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_dp_training_lowers_loss() -> None:
    model = _lora_model()
    ids, mask = _toy_data()
    before = evaluate_loss(model, ids, mask)
    plan = DPPlan(
        noise_multiplier=0.3, sample_rate=16 / 48, steps=60, max_grad_norm=1.0, expected_batch_size=16
    )
    stats = train_dp(model, ids, mask, plan, learning_rate=0.05, seed=0)
    after = evaluate_loss(model, ids, mask)
    assert stats.steps == 60
    assert after < before - 0.25, (before, after)
    assert not hasattr(model, "autograd_grad_sample_hooks")  # hooks removed: model reusable


@pytest.mark.parametrize("mode", DP_MODES)
def test_update_is_sum_of_clipped_per_record_gradients(mode: str) -> None:
    model = _lora_model()
    ids, mask = _toy_data(6)
    params = [p for p in model.parameters() if p.requires_grad]
    per_record = []
    for i in range(ids.size(0)):  # each record's own gradient, computed directly
        grads = torch.autograd.grad(per_sample_loss(model, ids[i : i + 1], mask[i : i + 1]).sum(), params)
        per_record.append(torch.cat([g.flatten() for g in grads]))
    norms = torch.stack([g.norm() for g in per_record])
    clip = float(norms.median())  # some records are clipped, some are not
    expected_batch = 4
    want = sum(g * min(1.0, clip / (float(n) + 1e-6)) for g, n in zip(per_record, norms, strict=True))
    assert isinstance(want, torch.Tensor)
    want = want / expected_batch

    plan = DPPlan(0.0, 0.5, 1, clip, expected_batch)
    stepper = DPStepper(
        model,
        plan,
        learning_rate=0.01,
        noise_generator=torch.Generator().manual_seed(0),
        mode=cast(DPMode, mode),
    )
    try:
        stepper.backward(ids, mask)
        stepper.optimizer.pre_step()  # clip, accumulate, add (zero) noise, scale: no AdamW step
        got = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    finally:
        stepper.close()
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_only_lora_layers_are_hooked() -> None:
    model = _lora_model()
    lora_linears = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    plan = DPPlan(1.0, 0.5, 1, 1.0, 4)
    stepper = DPStepper(model, plan, learning_rate=0.01, noise_generator=torch.Generator())
    try:
        hooks = stepper.module.autograd_grad_sample_hooks
        assert len(lora_linears) == 8 and len(hooks) == 2 * len(
            lora_linears
        )  # one forward + one backward each
    finally:
        stepper.close()
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_noise_is_unpredictable_unless_seeded(caplog: pytest.LogCaptureFixture) -> None:
    ids, mask = _toy_data()
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.3, steps=3, max_grad_norm=1.0, expected_batch_size=14)
    start = _lora_model()

    def run(seed: int | None) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(start)
        train_dp(model, ids, mask, plan, learning_rate=0.01, seed=seed)
        return _lora_state(model)

    with caplog.at_level(logging.WARNING, logger="client.train"):
        a, b = run(7), run(7)
    assert "NOT PRIVATE" in caplog.text
    assert all(torch.equal(a[k], b[k]) for k in a)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="client.train"):
        c, d = run(None), run(None)
    assert "NOT PRIVATE" not in caplog.text
    assert any(not torch.equal(c[k], d[k]) for k in c)


def test_empty_poisson_batches_count_as_steps_and_step_with_the_noise_alone() -> None:
    """Regression: an empty batch used to skip its step, so the update count depended on the sampling."""
    ids, mask = _toy_data(8)
    for sigma, moves in ((0.0, False), (1.0, True)):
        model = _lora_model()
        before = _lora_state(model)
        plan = DPPlan(
            noise_multiplier=sigma, sample_rate=1e-9, steps=5, max_grad_norm=1.0, expected_batch_size=1
        )
        stats = train_dp(model, ids, mask, plan, learning_rate=0.01, seed=None)
        assert stats.steps == 5 and stats.empty_batches == 5 and stats.batches == 0
        assert stats.mean_loss is None  # no record was seen: no loss to report
        after = _lora_state(model)
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        assert changed == moves  # no record: the update is the Gaussian noise, zero without noise


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown DP mode"):
        DPStepper(
            _lora_model(),
            DPPlan(1.0, 0.5, 1, 1.0, 4),
            learning_rate=0.01,
            noise_generator=torch.Generator(),
            mode=cast(DPMode, "fast"),
        )
