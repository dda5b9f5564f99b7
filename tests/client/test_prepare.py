"""Site preparation: resumable after a kill, incremental on appends, the only thing a round reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord

import client.prepare as prepare_mod
from client.data import load_site_data
from client.policy import load_policy, render_policy
from client.prepare import prepare_site
from client.prepared import SiteNotPreparedError, manifest_path
from common.errors import DataError
from embedded.synthdata import generate_site_records
from privacy.pii import Scrubber
from tests.client.hostile import Site, reason, status

pytestmark = pytest.mark.unprepared  # these tests prepare (or not) by hand


def _site(tmp_path: Path, records: list[dict[str, Any]], **kw: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    policy = tmp_path / "policy.toml"
    policy.write_text(
        render_policy(name="s1", data_path=data, model_path=tmp_path / "m", **kw), encoding="utf-8"
    )
    return policy


@pytest.fixture(scope="module")
def notes() -> list[dict[str, Any]]:
    return generate_site_records(0, 30, seed=3)[0]


@pytest.fixture
def scrubbed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of records each scrub call of this process got."""
    calls: list[int] = []
    real = Scrubber.scrub_groups

    def counting(self: Scrubber, groups: Any) -> Any:
        calls.append(len(groups))
        return real(self, groups)

    monkeypatch.setattr(Scrubber, "scrub_groups", counting)
    return calls


def test_a_round_refuses_an_unprepared_site_and_reads_the_prepared_set(
    tmp_path: Path, notes: list[dict[str, Any]], scrubbed: list[int]
) -> None:
    pol = load_policy(_site(tmp_path, notes))
    with pytest.raises(
        SiteNotPreparedError, match=r"site not prepared for kind sft: run `fedtune site prepare"
    ):
        load_site_data(pol)
    [done] = prepare_site(pol)
    assert (done.records, done.new, done.reused, done.changed) == (30, 30, 0, None)
    report = json.loads((pol.state_dir / "scrub-report.json").read_text())
    assert report["records"] == 30 and report["counts"]["PERSON"] > 0
    assert all(isinstance(v, int) for v in report["counts"].values())  # counts, never values
    calls = len(scrubbed)
    data = load_site_data(pol)
    assert len(scrubbed) == calls  # the round scrubs nothing
    assert len(data.train) + len(data.eval) == 30 and data.scrub_counts == report["counts"]
    pol.data_path.unlink()  # a round never reads the raw file
    assert load_site_data(pol).fingerprint == data.fingerprint


def test_a_rerun_after_a_kill_redoes_no_finished_chunk(
    tmp_path: Path, notes: list[dict[str, Any]], scrubbed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = load_policy(_site(tmp_path, notes))
    real, written = prepare_mod._write_chunk, list[Any]()

    def killed_after_two(*args: Any) -> Any:
        if len(written) == 2:
            raise KeyboardInterrupt  # the process dies between chunks
        written.append(real(*args))
        return written[-1]

    monkeypatch.setattr(prepare_mod, "_write_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_site(pol, chunk_records=8)
    assert not manifest_path(pol, "sft").exists()
    monkeypatch.setattr(prepare_mod, "_write_chunk", real)
    scrubbed.clear()
    [done] = prepare_site(pol, chunk_records=8)
    assert (done.new, done.reused) == (14, 16) and sum(scrubbed) == 14
    assert len(load_site_data(pol).train) > 0


def test_appended_records_are_the_only_ones_scrubbed(
    tmp_path: Path, notes: list[dict[str, Any]], scrubbed: list[int]
) -> None:
    pol = load_policy(_site(tmp_path, notes[:20]))
    prepare_site(pol)
    before = load_site_data(pol)
    with pol.data_path.open("a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in notes[20:])
    assert load_site_data(pol).fingerprint == before.fingerprint  # rounds keep the prepared set
    scrubbed.clear()
    [done] = prepare_site(pol)
    assert (done.records, done.new, done.reused, done.changed) == (30, 10, 20, True)
    assert sum(scrubbed) == 10
    assert "10 new, 20 reused" in done.summary() and "notes/s" in done.summary()
    after = load_site_data(pol)
    assert len(after.train) + len(after.eval) == 30
    scrubbed.clear()
    [again] = prepare_site(pol)
    assert (again.new, again.changed, sum(scrubbed)) == (0, False, 0)


def test_other_scrub_settings_need_a_new_preparation(tmp_path: Path, notes: list[dict[str, Any]]) -> None:
    policy = _site(tmp_path, notes[:10])
    prepare_site(load_policy(policy))
    policy.write_text(policy.read_text().replace('operator = "placeholder"', 'operator = "redact"'))
    pol = load_policy(policy)
    assert pol.pii.operator == "redact"
    with pytest.raises(SiteNotPreparedError, match="prepared with other operator"):
        load_site_data(pol)
    prepare_site(pol)
    assert "<PERSON>" not in "".join(e.text for e in load_site_data(pol).train)


def test_a_corrupt_prepared_set_is_refused_naming_the_file_and_the_fix(
    tmp_path: Path, notes: list[dict[str, Any]]
) -> None:
    pol = load_policy(_site(tmp_path, notes[:10]))
    prepare_site(pol, chunk_records=4)
    chunk = next(manifest_path(pol, "sft").parent.glob("*/*.json"))
    chunk.write_bytes(chunk.read_bytes()[:-20])
    with pytest.raises(DataError) as err:
        load_site_data(pol)
    assert str(chunk) in str(err.value) and "fedtune site prepare --policy" in str(err.value)
    [done] = prepare_site(pol, chunk_records=4)  # the damaged chunk is scrubbed again, the rest reused
    assert 0 < done.new <= 4 and done.reused == 10 - done.new
    manifest_path(pol, "sft").write_text('{"format": "fedtune-prepared/1", "kind": "sft"}')
    with pytest.raises(DataError, match=r"manifest.json: the prepared set is corrupt"):
        load_site_data(pol)


def test_a_bad_record_stops_preparation_with_file_line_and_fix(
    tmp_path: Path, notes: list[dict[str, Any]]
) -> None:
    pol = load_policy(_site(tmp_path, [*notes[:3], {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"notes.jsonl:4: record has no field 'response'.*Fix:"):
        prepare_site(pol)


def test_two_workers_prepare_what_one_does(tmp_path: Path) -> None:
    notes = generate_site_records(1, 130, seed=4)[0]  # enough batches for two processes
    one = load_policy(_site(tmp_path / "a", notes))
    two = load_policy(_site(tmp_path / "b", notes))
    prepare_site(one, workers=1)
    prepare_site(two, workers=2)
    assert load_site_data(one).train == load_site_data(two).train


def test_an_unprepared_site_refuses_before_any_budget_is_spent(
    tmp_path: Path, notes: list[dict[str, Any]], tiny_model: Path, start_adapter: ArrayRecord
) -> None:
    data, docs = tmp_path / "notes.jsonl", tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in notes), encoding="utf-8")
    docs.write_text("".join(json.dumps({"text": r["response"]}) + "\n" for r in notes), encoding="utf-8")
    site = Site(tmp_path / "site", data, tiny_model, cpt_path=docs)
    reply = site.ask(start_adapter, 1)  # nothing prepared: the site stops before its ledger
    assert status(reply) == "error" and "site not prepared for kind sft" in reason(reply)
    assert site.kinds() == []
    prepare_site(load_policy(site.policy), kinds=["sft"])
    reply = site.ask(start_adapter, 1, **{"train-kind": "cpt"})  # its documents were never prepared
    assert status(reply) == "refused" and "site not prepared for kind cpt" in reason(reply)
    assert site.kinds() == ["refuse"]  # recorded, nothing reserved
