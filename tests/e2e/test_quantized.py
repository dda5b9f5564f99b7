"""QLoRA end to end on CPU: sites train LoRA on a 4-bit base; the adapter serves any precision."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from common.runfolder import RunFolder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, site_data: Path) -> dict[str, Any]:
    """``fedtune simulate --quantization nf4 --sites 2 --rounds 2`` through the library call."""
    from fedtune.simulate import simulate

    out = tmp_path_factory.mktemp("runs") / "nf4"
    summary = simulate(
        out,
        sites=2,
        rounds=2,
        model=tiny_model,
        data=site_data,
        max_epsilon=8.0,
        compute={"quantization": "nf4", "gradient-checkpointing": True},
    )
    return {"out": out, "summary": summary}


def test_every_site_trains_both_rounds_within_budget(nf4_run: dict[str, Any]) -> None:
    summary = nf4_run["summary"]
    assert summary["status"] == "completed"
    assert len(summary["sites"]) == 2
    for name, site in summary["sites"].items():
        assert site["rounds_trained"] == 2 and not site["failures"], name
        assert 0 < site["epsilon"] <= site["max_epsilon"] == 8.0, name
        assert site["eval_loss_after"] < site["eval_loss_before"], name


def test_the_sites_policies_say_how_they_trained(nf4_run: dict[str, Any]) -> None:
    for policy in sorted(RunFolder(nf4_run["out"]).sites.glob("*/policy.toml")):
        compute = tomllib.loads(policy.read_text(encoding="utf-8"))["compute"]
        assert compute["quantization"] == "nf4" and compute["gradient-checkpointing"] is True


@pytest.mark.parametrize("quantized", [False, True])
def test_the_exported_adapter_loads_with_peft(
    nf4_run: dict[str, Any], tiny_model: Path, quantized: bool
) -> None:
    """The adapter trained on a 4-bit base loads on the full-precision base too, and changes it."""
    from peft import PeftModel

    from client.compute import Compute, load_base
    from client.train import evaluate_loss

    adapter = RunFolder(nf4_run["out"]).adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] > 0
    compute = Compute("cpu", "float32", "nf4" if quantized else "none", False, None)
    base = load_base(tiny_model, compute)
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    before = evaluate_loss(base, ids, mask)
    tuned = PeftModel.from_pretrained(base, str(adapter))
    loaded = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert loaded and all(bool(p.abs().sum() > 0) for p in loaded)  # trained B, not the zero init
    assert evaluate_loss(tuned, ids, mask) != before
