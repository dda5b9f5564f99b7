"""The site agent below the Flower layer: budget gate, policy floors, restarts, bad data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from client.policy import load_policy, render_policy
from client.prepare import prepare_site
from client.site import SiteAgent
from common.arrays import to_record
from common.config import LoraSpec, RunConfig, TrainRequest
from common.errors import DataError
from common.modeling import adapter_state, load_base_model, make_peft_model, model_fingerprint
from embedded.synthdata import generate_site_records
from privacy.accounting import MechanismStep, epsilon
from privacy.ledger import PrivacyLedger

LORA = LoraSpec(rank=4, alpha=8, targets="q_proj,v_proj")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records, _ = generate_site_records(0, 40, seed=5)
    path = tmp_path_factory.mktemp("small") / "site.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _policy(tmp: Path, data: Path, model: Path, **kw: Any) -> Path:
    p = tmp / "site" / "policy.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_policy(name="s1", data_path=data, model_path=model, **kw), encoding="utf-8")
    return p


def _request(model: Path, rnd: int = 1, rounds: int = 2, **kw: Any) -> TrainRequest:
    cfg = RunConfig.from_flower(
        {
            "local-steps": 3,
            "batch-size": 6,
            "max-seq-len": 64,
            "lora-rank": 4,
            "lora-alpha": 8,
            "num-server-rounds": rounds,
            **kw,
        }
    )
    return TrainRequest.build(cfg, server_round=rnd, run_id="run1", fingerprint=model_fingerprint(model))


def _global(model: Path) -> ArrayRecord:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return to_record(adapter_state(make_peft_model(load_base_model(model), LORA)))


def test_reply_holds_lora_arrays_only(tmp_path: Path, tiny_model: Path, small_data: Path) -> None:
    agent = SiteAgent(load_policy(_policy(tmp_path, small_data, tiny_model)))
    out = agent.train_round(_global(tiny_model), _request(tiny_model))
    assert out.trained and out.arrays is not None
    assert all(".lora_A." in k or ".lora_B." in k for k in out.arrays)
    base = load_base_model(tiny_model)
    base_shapes = {tuple(p.shape) for p in base.parameters()}
    assert not base_shapes & {tuple(a.shape) for a in out.arrays.values()}
    lora_params = sum(p.numel() for n, p in make_peft_model(base, LORA).named_parameters() if "lora_" in n)
    assert sum(a.numpy().size for a in out.arrays.values()) == lora_params
    entries = PrivacyLedger(agent.policy.ledger_path).entries()
    assert [e.kind for e in entries] == ["reserve", "commit"]
    assert 0 < out.metrics["epsilon"] <= agent.policy.privacy.max_epsilon


def test_noise_below_site_floor_is_refused_and_recorded(
    tmp_path: Path, tiny_model: Path, small_data: Path
) -> None:
    agent = SiteAgent(load_policy(_policy(tmp_path, small_data, tiny_model)))
    low: dict[str, Any] = {"noise-multiplier": 0.1}
    out = agent.train_round(_global(tiny_model), _request(tiny_model, **low))
    assert not out.trained and out.arrays is None
    assert "min-noise-multiplier" in out.reason
    entries = PrivacyLedger(agent.policy.ledger_path).entries()
    assert [e.kind for e in entries] == ["refuse"]
    assert PrivacyLedger(agent.policy.ledger_path).history() == []


def test_base_model_mismatch_is_refused(tmp_path: Path, tiny_model: Path, small_data: Path) -> None:
    agent = SiteAgent(load_policy(_policy(tmp_path, small_data, tiny_model)))
    req = _request(tiny_model)
    req = TrainRequest(**{**req.__dict__, "base_model_fingerprint": "0" * 64})
    out = agent.train_round(_global(tiny_model), req)
    assert not out.trained and "base model differs" in out.reason


def test_bad_data_fails_before_any_budget_is_spent(
    tmp_path: Path, tiny_model: Path, small_data: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = small_data.read_text(encoding="utf-8").splitlines()
    lines[6] = lines[6][:-5]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    agent = SiteAgent(load_policy(_policy(tmp_path, bad, tiny_model)))
    with pytest.raises(DataError) as err:
        agent.train_round(_global(tiny_model), _request(tiny_model))
    assert f"{bad}:7" in str(err.value) and "Fix:" in str(err.value)
    assert not agent.policy.ledger_path.exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"batch-size": 30}, "max-sample-rate"),
        ({"max-grad-norm": 50.0}, "max-grad-norm"),
        ({"local-steps": 5000}, "max-steps-per-round"),
    ],
)
def test_requests_looser_than_the_policy_are_refused(
    tmp_path: Path, tiny_model: Path, small_data: Path, override: dict[str, Any], key: str
) -> None:
    agent = SiteAgent(load_policy(_policy(tmp_path, small_data, tiny_model)))
    out = agent.train_round(_global(tiny_model), _request(tiny_model, **override))
    assert not out.trained and key in out.reason
    assert [e.kind for e in PrivacyLedger(agent.policy.ledger_path).entries()] == ["refuse"]


RESTART_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from client.policy import load_policy
    from client.site import SiteAgent
    from common.arrays import to_record
    from common.config import LoraSpec, RunConfig, TrainRequest
    from common.modeling import adapter_state, load_base_model, make_peft_model, model_fingerprint
    policy, model, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    lora = LoraSpec(4, 8, "q_proj,v_proj")
    arrays = to_record(adapter_state(make_peft_model(load_base_model(model), lora)))
    cfg = RunConfig.from_flower({"local-steps": 3, "batch-size": 6, "max-seq-len": 64, "lora-rank": 4,
                                 "lora-alpha": 8, "num-server-rounds": 3})
    req = TrainRequest.build(cfg, server_round=rnd, run_id="r", fingerprint=model_fingerprint(model))
    out = SiteAgent(load_policy(policy)).train_round(arrays, req)
    print(json.dumps({"trained": out.trained, **out.metrics}))
""")


def test_epsilon_continues_across_process_restarts(
    tmp_path: Path, tiny_model: Path, small_data: Path
) -> None:
    policy = _policy(tmp_path, small_data, tiny_model)
    prepare_site(load_policy(policy))  # the rounds run in other processes
    results = []
    for rnd in (1, 2):  # each round in a brand-new process: only the state dir carries over
        proc = subprocess.run(
            [sys.executable, "-c", RESTART_SCRIPT, str(policy), str(tiny_model), str(rnd)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = results
    assert first["trained"] and second["trained"]
    step = MechanismStep(first["noise-multiplier"], first["sample-rate"], int(first["steps"]))
    assert second["noise-multiplier"] == first["noise-multiplier"]  # calibrated once per run
    assert first["epsilon"] == pytest.approx(epsilon([step], delta=1e-5), rel=1e-9)
    assert second["epsilon"] == pytest.approx(epsilon([step, step], delta=1e-5), rel=1e-9)
    assert second["epsilon"] > first["epsilon"] * 1.2
    assert second["epsilon"] <= load_policy(policy).privacy.max_epsilon


CRASH_SCRIPT = RESTART_SCRIPT.replace(
    "out = SiteAgent",
    "import time, client.site\n"
    "def hang(*a, **k):\n    print('RESERVED', flush=True)\n    time.sleep(600)\n"
    "client.site.train_dp = hang\n"
    "out = SiteAgent",
)


def test_reservation_counts_when_the_site_dies_mid_training(
    tmp_path: Path, tiny_model: Path, small_data: Path
) -> None:
    policy = _policy(tmp_path, small_data, tiny_model)
    prepare_site(load_policy(policy))  # the rounds run in other processes
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(policy), str(tiny_model), "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "RESERVED"  # training started after the reservation
    finally:
        proc.kill()  # SIGKILL: no cleanup, no commit
        proc.wait(timeout=60)
    ledger = PrivacyLedger(load_policy(policy).ledger_path)
    [reserved] = ledger.entries()
    assert reserved.kind == "reserve" and ledger.verify_chain() == []
    step1 = MechanismStep(
        reserved.raw["noise_multiplier"], reserved.raw["sample_rate"], reserved.raw["steps"]
    )
    out = SiteAgent(load_policy(policy)).train_round(
        _global(tiny_model), _request(tiny_model, rnd=2, rounds=3)
    )
    assert out.trained
    step2 = MechanismStep(
        out.metrics["noise-multiplier"], out.metrics["sample-rate"], int(out.metrics["steps"])
    )
    assert out.metrics["epsilon"] == pytest.approx(epsilon([step1, step2], delta=1e-5), rel=1e-9)
    assert out.metrics["epsilon"] > epsilon([step2], delta=1e-5)


def test_ffa_lora_trains_and_sends_b_only(tmp_path: Path, tiny_model: Path, small_data: Path) -> None:
    agent = SiteAgent(load_policy(_policy(tmp_path, small_data, tiny_model)))
    start = _global(tiny_model)
    out = agent.train_round(start, _request(tiny_model, **{"ffa-lora": True}))
    assert out.trained and out.arrays is not None
    assert out.arrays and all(".lora_B." in k for k in out.arrays)
    assert len(out.arrays) * 2 == len(start)
    state = agent._model.state_dict()
    for key, arr in start.items():
        if ".lora_A." in key:  # A stays the shared initialisation
            local = next(v for k, v in state.items() if k.replace(".default", "") == key)
            assert torch.equal(local, torch.from_numpy(arr.numpy()))


def test_non_private_training_needs_the_sites_consent(
    tmp_path: Path, tiny_model: Path, small_data: Path
) -> None:
    policy = _policy(tmp_path, small_data, tiny_model)
    agent = SiteAgent(load_policy(policy))
    out = agent.train_round(_global(tiny_model), _request(tiny_model, dp=False))
    assert not out.trained and "allow-non-private" in out.reason
    policy.write_text(
        render_policy(name="s1", data_path=small_data, model_path=tiny_model, allow_non_private=True),
        encoding="utf-8",
    )
    agent = SiteAgent(load_policy(policy))
    out = agent.train_round(_global(tiny_model), _request(tiny_model, dp=False))
    assert out.trained and "epsilon" not in out.metrics and out.metrics["noise-multiplier"] == 0.0
    assert out.metrics["private"] == 0.0
    # the release is in the ledger, and from then on no DP round can be granted: the records are spent
    assert [e.kind for e in PrivacyLedger(agent.policy.ledger_path).entries()] == [
        "refuse",
        "release",
        "commit",
    ]
    later = agent.train_round(_global(tiny_model), _request(tiny_model, rnd=2))
    assert not later.trained and "released WITHOUT differential privacy" in later.reason


def test_seeded_sites_draw_different_noise(tmp_path: Path, tiny_model: Path, small_data: Path) -> None:
    """Regression: with one run seed, every site drew the same sampling and noise (no averaging gain)."""
    updates = []
    for name in ("s1", "s2"):
        p = tmp_path / name / "policy.toml"
        p.parent.mkdir(parents=True)
        text = render_policy(name=name, data_path=small_data, model_path=tiny_model, allow_seeded_noise=True)
        p.write_text(text, encoding="utf-8")
        out = SiteAgent(load_policy(p)).train_round(_global(tiny_model), _request(tiny_model, seed=3))
        assert out.arrays is not None
        updates.append(out.arrays)
    a, b = updates
    assert any((a[k].numpy() != b[k].numpy()).any() for k in a)  # same data and seed, different sites
    again = SiteAgent(load_policy(tmp_path / "s1" / "policy.toml"))
    again.ledger.path.unlink()  # a brand-new site (ledger and head record gone): the request may train again
    again.policy.ledger_head.unlink()
    repeat = again.train_round(_global(tiny_model), _request(tiny_model, seed=3)).arrays
    assert repeat is not None and all((repeat[k].numpy() == a[k].numpy()).all() for k in a)  # reproducible
