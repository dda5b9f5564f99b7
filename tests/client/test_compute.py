"""The site's compute settings: DP stays exact on every CPU-runnable path, errors name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.compute import (
    Compute,
    ComputeSection,
    check_fit,
    estimate_bytes,
    load_base,
    resolve,
)
from client.objectives import row_nll, token_mean
from client.policy import SECTIONS
from client.tokens import CONTEXT, PAD, TARGET
from client.train import DPPlan, DPStepper, evaluate_loss
from common.declare import parse
from common.errors import ConfigError
from common.modeling import adapter_state, load_adapter_state, make_peft_model
from tests.client.lora import LORA, SETTINGS, lora_model

pytestmark = pytest.mark.usefixtures("one_thread")


GROUP = torch.tensor([0, 0, 1, 2, 3, 4])  # rows 0 and 1: two chunks of one long document (one record)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw text (every token a target; one 2-chunk document) and instruction records (prompt not learned)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 200, (6, 20), generator=gen)
    mask = torch.full_like(ids, TARGET)
    mask[1, 12:] = PAD
    mask[4, 7:] = PAD
    mask[2, :9] = CONTEXT
    mask[3, :3] = CONTEXT
    mask[4, :4] = CONTEXT
    return ids, mask


def _brute_force(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each record's gradient by its own backward pass (``[records, lora params]``), no Opacus."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(int(GROUP.max()) + 1):
        model.zero_grad(set_to_none=True)
        token_mean(model, ids, mask, GROUP)[i].backward()
        rows.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def _each_alone(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each record's gradient from a batch of that record's rows alone (a second, independent method)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(int(GROUP.max()) + 1):
        mine = i == GROUP
        nll, count = row_nll(model, ids[mine], mask[mine])
        grads = torch.autograd.grad(nll.sum() / count.sum(), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_per_record_gradients_and_clipped_sum_equal_brute_force(tiny_model: Path, setting: str) -> None:
    compute = SETTINGS[setting]
    model = lora_model(tiny_model, compute)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # LoRA stays float32 on every path
    ids, mask = _batch()
    brute = _brute_force(model, ids, mask)
    norms = brute.norm(dim=1)
    clip = float(norms.median())
    expected_batch = 4
    want = (brute * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / expected_batch

    stepper = DPStepper(
        model,
        DPPlan(0.0, 0.5, 1, clip, expected_batch),
        learning_rate=0.01,
        noise_generator=torch.Generator().manual_seed(0),
    )
    try:
        stepper.backward(ids, mask, GROUP)
        per_record = torch.cat([p.grad_sample.reshape(brute.size(0), -1) for p in params], dim=1)
        stepper.optimizer.pre_step()  # clip, sum, add (zero) noise, scale; no AdamW step
        got = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    finally:
        stepper.close()
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()  # some records are clipped
    assert _rel(per_record, brute) < 1e-3, setting
    if compute.dtype == "float32" and not compute.gradient_checkpointing:  # (autograd.grad: no reentrancy)
        # In float32 arithmetic a record's gradient does not depend on its batch mates; in bfloat16 the
        # batch shape changes the kernels' rounding (~3e-3 relative), so there only the above applies.
        assert _rel(per_record, _each_alone(model, ids, mask)) < 1e-3, setting
    assert _rel(got, want) < 1e-3, setting
    assert evaluate_loss(model, ids, mask) > 0  # eval works on the same model (bnb's CPU packing is off)


def test_non_reentrant_checkpointing_is_refused_not_trained_unclipped(tiny_model: Path) -> None:
    """With torch's non-reentrant checkpoint Opacus's hooks never fire: the step stops instead."""
    model = lora_model(tiny_model, SETTINGS["fp32"])
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    stepper = DPStepper(
        model, DPPlan(1.0, 0.5, 1, 1.0, 4), learning_rate=0.01, noise_generator=torch.Generator()
    )
    try:
        with pytest.raises(RuntimeError, match="no per-record gradients"):
            stepper.backward(*_batch())
    finally:
        stepper.close()


def test_an_adapter_trained_on_a_4bit_base_loads_on_the_full_precision_base(tiny_model: Path) -> None:
    quantized = lora_model(tiny_model, SETTINGS["nf4-base"])
    full = make_peft_model(load_base(tiny_model, SETTINGS["fp32"]), LORA)
    state = adapter_state(quantized)
    load_adapter_state(full, state)
    for key, value in adapter_state(full).items():
        torch.testing.assert_close(value, state[key])


def test_auto_is_cpu_float32_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    plan = resolve(ComputeSection())
    assert (plan.device, plan.dtype, plan.quantization) == ("cpu", "float32", "none")


def test_cuda_asked_for_and_absent_names_the_fix() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"device = 'cuda:1'.*set device = 'cpu'"):
        resolve(ComputeSection(device="cuda:1"), where="site.toml [compute]")


def test_the_compute_section_rejects_unknown_values_with_their_key() -> None:
    assert SECTIONS["compute"] is ComputeSection
    with pytest.raises(ConfigError) as err:
        parse(ComputeSection, {"device": "gpu", "quantization": "nf8", "max-memory-gb": -1}, "[compute]")
    text = str(err.value)
    assert "'device' must be auto, cpu, cuda or cuda:N" in text
    assert "'quantization' must be one of none, nf4, int8" in text
    assert "'max-memory-gb'" in text


def test_a_model_that_will_not_fit_is_refused_before_training(tiny_model: Path) -> None:
    fp32 = SETTINGS["fp32"]
    need = estimate_bytes(tiny_model, fp32)
    assert estimate_bytes(tiny_model, SETTINGS["nf4-base"]) < need / 4  # 4 bits: about 1/7 of fp32
    small = Compute("cpu", "float32", "none", False, need // 2)
    with pytest.raises(ConfigError, match=r"needs about .* MiB.*quantization = 'nf4'.*max-memory-gb"):
        check_fit(tiny_model, small)
    check_fit(tiny_model, Compute("cpu", "float32", "none", False, need * 2))
