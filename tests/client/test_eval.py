"""Held-out evaluation at a site: one forward pass per adapter, a fixed bounded sample, its error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord

import client.records
from client.evaluation import CACHE_ENTRIES, EvalCache, ratio_stderr, sample_held
from client.objectives import record_nll, row_nll
from client.policy import load_policy, render_policy
from client.site import SiteAgent
from client.tokens import Example, tokenize_examples
from common.config import RunConfig, TrainRequest
from common.errors import ConfigError
from common.modeling import load_tokenizer, model_fingerprint
from embedded.synthdata import generate_site_records
from tests.client.lora import lora_model


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 synthetic records: about 20 held out."""
    records, _ = generate_site_records(0, 100, seed=5)
    path = tmp_path_factory.mktemp("eval") / "site.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site folder and state dir per module: its records are prepared once."""
    return tmp_path_factory.mktemp("site")


@pytest.fixture(autouse=True)
def no_cache(site_dir: Path) -> None:
    """Each test starts without held-out results (the records stay prepared)."""
    (site_dir / "state" / "eval-cache.json").unlink(missing_ok=True)


def _agent(site: Path, data: Path, model: Path, name: str, **evaluation: Any) -> SiteAgent:
    """A fresh agent (what a fresh ClientApp process builds) with the policy ``name``."""
    policy = site / f"{name}.toml"
    head = site / "ledger-head.json"  # one ledger (and head) whatever the policy's name
    policy.write_text(render_policy(name="s1", data_path=data, model_path=model, ledger_head=head,
                                    evaluation=evaluation), encoding="utf-8")  # fmt: skip
    return SiteAgent(load_policy(policy))


def _request(model: Path, rnd: int = 1, **kw: Any) -> TrainRequest:
    cfg = RunConfig.from_flower({"local-steps": 2, "batch-size": 6, "max-seq-len": 64, "lora-rank": 4,
                                 "lora-alpha": 8, "num-server-rounds": 3, **kw})  # fmt: skip
    return TrainRequest.build(cfg, server_round=rnd, run_id="run1", fingerprint=model_fingerprint(model))


@pytest.fixture
def forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the held-out forward passes (each call scores one sample of records)."""
    calls: list[int] = []
    real = client.records.held_out

    def counting(train: Any, model: Any, sample: Any) -> dict[str, float]:
        calls.append(sample.records)
        return real(train, model, sample)

    monkeypatch.setattr(client.records, "held_out", counting)
    return calls


def test_each_adapter_is_scored_once_across_processes(
    site_dir: Path, data: Path, tiny_model: Path, start_adapter: ArrayRecord, forwards: list[int]
) -> None:
    quiet = {"report-sampling": False}
    once = _agent(site_dir, data, tiny_model, "once", **quiet)
    first = once.train_round(start_adapter, _request(tiny_model))
    assert first.trained and first.arrays is not None and len(forwards) == 1
    merged = first.arrays  # the coordinator's next global adapter (one site: its own update)
    metrics, n = _agent(site_dir, data, tiny_model, "once", **quiet).evaluate(merged, _request(tiny_model))
    assert len(forwards) == 2 and n > 0
    again = _agent(site_dir, data, tiny_model, "once", **quiet)
    second = again.train_round(merged, _request(tiny_model, rnd=2))
    assert second.trained and len(forwards) == 2  # round 2's eval-loss-before is round 1's evaluation
    assert second.metrics["eval-loss-before"] == metrics["eval-loss"]
    assert again.evaluate(merged, _request(tiny_model, rnd=2))[0] == metrics and len(forwards) == 2
    assert again.loads["held-out"] == 0
    assert set(metrics) == {"eval-loss"}  # no sampling keys where the policy keeps them back
    sampling = {"eval-records-before", "eval-loss-stderr-before"}
    assert not sampling & set(second.metrics)
    told = _agent(site_dir, data, tiny_model, "told")  # the default: reported
    third = told.train_round(merged, _request(tiny_model, rnd=3))
    assert third.trained and len(forwards) == 2 and sampling <= set(third.metrics)
    assert third.metrics["eval-records-before"] == n and third.metrics["eval-loss-stderr-before"] == 0.0


def test_what_changes_the_result_changes_the_key(
    site_dir: Path, data: Path, tiny_model: Path, start_adapter: ArrayRecord, forwards: list[int]
) -> None:
    agent = _agent(site_dir, data, tiny_model, "keys")
    base = agent.evaluate(start_adapter, _request(tiny_model))[0]
    slower: dict[str, Any] = {"learning-rate": 0.01}  # no effect on the loss
    agent.evaluate(start_adapter, _request(tiny_model, **slower))
    assert len(forwards) == 1
    shorter = agent.evaluate(start_adapter, _request(tiny_model, **{"max-seq-len": 48}))[0]
    arrays = {k: v.numpy().copy() for k, v in start_adapter.items()}
    key = next(k for k in arrays if ".lora_B." in k)  # B = 0 at the start: A alone changes nothing
    arrays[key][0, 0] += 0.5
    moved = agent.evaluate(ArrayRecord({k: Array(v) for k, v in arrays.items()}), _request(tiny_model))[0]
    assert len(forwards) == 3 and shorter != base and moved != base


def test_a_corrupt_cache_is_ignored_and_rewritten(
    site_dir: Path, data: Path, tiny_model: Path, start_adapter: ArrayRecord, forwards: list[int]
) -> None:
    agent = _agent(site_dir, data, tiny_model, "corrupt")
    want = agent.evaluate(start_adapter, _request(tiny_model))[0]
    cache = agent.policy.state_dir / "eval-cache.json"
    entries = json.loads(cache.read_text())["entries"]
    partial = json.dumps({"version": 1, "entries": {k: {"eval-loss": 0.0} for k in entries}})
    for garbage in (partial, '{"version": 1, "entries": {"k": {"eval-loss": "x"}}', "\x00{not json", "[]"):
        cache.write_text(garbage, encoding="utf-8")
        assert (
            _agent(site_dir, data, tiny_model, "corrupt").evaluate(start_adapter, _request(tiny_model))[0]
            == want
        )
    assert len(forwards) == 5 and json.loads(cache.read_text())["version"] == 1


def test_the_cache_keeps_the_newest_entries(tmp_path: Path) -> None:
    cache = EvalCache(tmp_path / "eval-cache.json")
    for i in range(CACHE_ENTRIES + 10):
        cache.put(f"k{i}", {"eval-loss": float(i), "eval-records": 4.0, "eval-loss-stderr": 0.1})
    newest = cache.get(f"k{CACHE_ENTRIES + 9}")
    assert cache.get("k9") is None and newest is not None and newest["eval-loss"] == CACHE_ENTRIES + 9
    assert len(json.loads(cache.path.read_text())["entries"]) == CACHE_ENTRIES


def test_the_sample_is_fixed_bounded_and_reported(
    site_dir: Path, data: Path, tiny_model: Path, start_adapter: ArrayRecord
) -> None:
    full, n = _agent(
        site_dir, data, tiny_model, "all", **{"max-records": 0, "report-sampling": True}
    ).evaluate(start_adapter, _request(tiny_model))
    assert full["eval-records"] == n > 10 and full["eval-loss-stderr"] == 0.0  # every record: no error
    few = {"max-records": 6, "report-sampling": True}
    a = _agent(site_dir, data, tiny_model, "few-a", **few).evaluate(start_adapter, _request(tiny_model))[0]
    b = _agent(site_dir, data, tiny_model, "few-b", **few).evaluate(start_adapter, _request(tiny_model))[0]
    assert a == b and a["eval-records"] == 6 and a["eval-loss-stderr"] > 0
    assert abs(a["eval-loss"] - full["eval-loss"]) < 4 * a["eval-loss-stderr"] + 0.05


def test_full_evaluation_only_when_the_site_allows_it(
    site_dir: Path, data: Path, tiny_model: Path, start_adapter: ArrayRecord
) -> None:
    ask = _request(tiny_model).to_record() | {"eval-full": True}
    bounded = {"max-records": 6, "report-sampling": True}
    denied = _agent(site_dir, data, tiny_model, "deny", **bounded).evaluate(start_adapter, ask)[0]
    allowed = _agent(site_dir, data, tiny_model, "allow", **bounded, **{"allow-full-on-request": True})
    metrics, n = allowed.evaluate(start_adapter, ask)
    assert denied["eval-records"] == 6 and metrics["eval-records"] == n > 6
    with pytest.raises(ConfigError, match="max-records"):
        _agent(site_dir, data, tiny_model, "bad", **{"max-records": 1})


def test_sample_is_the_smallest_salted_hashes_and_skips_records_left_out(tiny_model: Path) -> None:
    records, _ = generate_site_records(1, 30, seed=3)
    examples = [Example(r["instruction"], r["response"]) for r in records]
    held = tokenize_examples(examples, load_tokenizer(tiny_model), 64)
    texts = [e.text for e in examples]
    a, b = sample_held(held, texts, 5), sample_held(held, list(texts), 5)
    assert a.digest == b.digest and a.records == 5 and a.population == held.records
    assert sample_held(held, texts, 0).records == held.records
    rows = {tuple(r.tolist()) for r in a.ids}
    assert rows <= {tuple(r.tolist()) for r in held.ids}
    assert sample_held(held, texts, 6).digest != a.digest


def test_ratio_stderr_matches_the_spread_of_repeated_samples() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(5, 60, (400,), generator=gen).double()
    values = weights * (2.0 + torch.randn(400, generator=gen).double()).abs()
    truth = float(values.sum() / weights.sum())
    n, estimates, errors = 40, [], []
    for _ in range(2000):
        pick = torch.randperm(400, generator=gen)[:n]
        estimates.append(float(values[pick].sum() / weights[pick].sum()))
        errors.append(ratio_stderr(values[pick], weights[pick], 400))
    spread = math.sqrt(sum((e - truth) ** 2 for e in estimates) / len(estimates))
    assert sum(errors) / len(errors) == pytest.approx(spread, rel=0.1)
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    want = math.sqrt((1 - 4 / 10) * float(flat.var()) / 4)
    assert ratio_stderr(flat, torch.ones(4, dtype=torch.float64), 10) == pytest.approx(want)
    assert ratio_stderr(flat, torch.ones(4, dtype=torch.float64), 4) == 0.0


def test_fast_held_out_loss_equals_the_training_loss_path(tiny_model: Path) -> None:
    records, _ = generate_site_records(2, 12, seed=4)
    examples = [Example(r["instruction"], r["response"]) for r in records[:8]]
    examples += [Example("", r["response"] * 3) for r in records[8:]]  # raw text: chunked records
    tok = tokenize_examples(examples, load_tokenizer(tiny_model), 48)
    model = lora_model(tiny_model)
    with torch.no_grad():
        nll, count = row_nll(model, tok.ids, tok.roles)
    fast, fast_count = record_nll(model, tok.ids, tok.roles, tok.group, batch=3)
    want = torch.zeros(tok.records, dtype=torch.float64).index_add_(0, tok.group, nll.double())
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast_count, torch.zeros_like(fast).index_add_(0, tok.group, count.double()))
    assert tok.chunked and model.training  # the model's mode is restored
