"""End-to-end: a real Flower simulation of 3 sites, shared by every test that only reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client.data import load_site_data
from client.policy import load_policy
from privacy.accounting import MechanismStep, epsilon
from privacy.keys import load_verifier
from privacy.ledger import PrivacyLedger, canonical_bytes

pytestmark = pytest.mark.slow


def _ledger(run: dict[str, Any], site: str) -> list[dict[str, Any]]:
    path = run["out"] / "ledgers" / f"{site}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_site_learns_within_its_budget(demo_run: dict[str, Any]) -> None:
    s = demo_run["summary"]
    assert s["rounds"] == 3 and len(s["sites"]) == 3
    for name, site in s["sites"].items():
        assert site["rounds_trained"] == 3, name
        assert site["eval_loss_after"] < site["eval_loss_before"], name
        assert 0 < site["epsilon"] <= site["max_epsilon"] == 8.0, name
        assert site["delta"] == 1e-5
        assert site["scrub"]["PERSON"] > 0 and site["scrub"]["MEDICAL_RECORD_NUMBER"] > 0
    lines = (demo_run["out"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    assert s["bytes_up"] == 3 * 3 * s["adapter_bytes"]


def test_ledgers_record_every_round_and_recompute(demo_run: dict[str, Any]) -> None:
    for name, site in demo_run["summary"]["sites"].items():
        entries = _ledger(demo_run, name)
        reserves = [e for e in entries if e["kind"] == "reserve"]
        assert [e["round"] for e in reserves] == [1, 2, 3]
        assert len([e for e in entries if e["kind"] == "commit"]) == 3
        for key in (
            "noise_multiplier",
            "sample_rate",
            "steps",
            "max_grad_norm",
            "delta",
            "epsilon",
            "accountant",
            "data_fingerprint",
        ):
            assert key in reserves[0]
        history = [MechanismStep(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in reserves]
        fresh = epsilon(history, delta=reserves[-1]["delta"], accountant="prv")
        assert fresh == pytest.approx(reserves[-1]["epsilon"], rel=1e-2)
        assert site["epsilon"] == pytest.approx(reserves[-1]["epsilon"])
        # the coordinator kept each site's receipt: the same commit entries the site's ledger holds
        receipts = [json.loads(x) for x in (demo_run["out"] / "receipts.jsonl").read_text().splitlines()]
        mine = [(r["entry"]["seq"], r["entry"]["hash"]) for r in receipts if r["site"] == name]
        assert mine == [(e["seq"], e["hash"]) for e in entries if e["kind"] == "commit"]
        # every entry is signed with the site's key; the public half is in RUN/keys/
        verify = load_verifier(demo_run["out"] / "keys" / f"{name}.pub")
        assert all(verify(canonical_bytes(e), e["signature"]) for e in entries)
        assert (
            PrivacyLedger(demo_run["out"] / "ledgers" / f"{name}.jsonl", verifier=verify).verify_chain() == []
        )


def test_adapter_is_a_standard_peft_directory(demo_run: dict[str, Any], tiny_model: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from common.modeling import load_base_model

    adapter = demo_run["out"] / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)  # no base weight
    base_shapes = {tuple(p.shape) for p in load_base_model(tiny_model).parameters()}
    assert not base_shapes & {tuple(v.shape) for v in weights.values()}
    model = PeftModel.from_pretrained(load_base_model(tiny_model), str(adapter))
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)  # the federated adapter changes the model


def test_scrubbed_training_text_holds_no_planted_pii(demo_run: dict[str, Any], site_data: Path) -> None:
    for name in demo_run["summary"]["sites"]:
        planted = json.loads((site_data / f"{name}.pii.json").read_text(encoding="utf-8"))
        data = load_site_data(load_policy(demo_run["out"] / "sites" / name / "policy.toml"))  # prepared
        rows = [e.to_row() for e in data.train + data.eval]
        text = "\n".join([f for row in rows for f in row[:4]] + [c for row in rows for _, c in row[4]])
        leaked = [p for p in planted if p["value"] in text]
        assert not leaked, f"{name}: {len(leaked)} planted values survived, e.g. {leaked[0]['entity_type']}"


def test_budget_too_small_is_refused_and_run_ends_cleanly(
    tmp_path: Path, tiny_model: Path, site_data: Path, demo_run: dict[str, Any]
) -> None:
    from fedtune.simulate import simulate

    sigma, steps, batch = 1.0, 20, 16
    sizes = [s["num_examples"] for s in demo_run["summary"]["sites"].values()][:2]
    one = [epsilon([MechanismStep(sigma, batch / n, steps)], delta=1e-5) for n in sizes]
    two = [epsilon([MechanismStep(sigma, batch / n, steps)] * 2, delta=1e-5) for n in sizes]
    budget = max(one) * 1.02
    assert budget < min(two)  # room for exactly one round at every site
    summary = simulate(
        tmp_path / "small",
        sites=2,
        rounds=2,
        model=tiny_model,
        data=site_data,
        max_epsilon=budget,
        privacy={"max-epsilon-per-round": budget},  # this site lets one round spend its whole budget
        run_config={
            "noise-multiplier": sigma,
            "local-steps": steps,
            "site-dp-noise": 0.5,
            "site-dp-clip": 5.0,
        },
    )
    assert summary["status"] == "stopped" and "fewer than min-train-sites=2" in summary["stop_reason"]
    for name, site in summary["sites"].items():
        assert site["rounds_trained"] == 1, name
        assert site["epsilon"] <= budget
        [refusal] = site["refusals"]
        assert refusal["round"] == 2
        assert "budget" in refusal["reason"] and f"max-epsilon={budget:g}" in refusal["reason"]
        kinds = [
            json.loads(x)["kind"]
            for x in (tmp_path / "small" / "ledgers" / f"{name}.jsonl").read_text().splitlines()
        ]
        assert kinds == ["reserve", "commit", "refuse"]
    assert (tmp_path / "small" / "adapter" / "adapter_config.json").is_file()
    # site-level DP at the coordinator is accounted apart, and only for rounds it released
    site_dp = summary["site_level_dp"]
    assert site_dp["releases"] == 1 and site_dp["epsilon"] > 0 and site_dp["delta"] == 1e-3
