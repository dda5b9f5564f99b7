"""``fedtune scrub``: same records, same order, named fields scrubbed, nothing planted left."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from common.errors import DataError
from embedded.synthpii import generate_labelled_texts
from fedtune.scrub_cli import scrub
from privacy.pii_eval import STRUCTURED

app = typer.Typer()
app.command("scrub")(scrub)
app.command("noop")(lambda: None)  # two commands: "scrub" stays a sub-command, as in fedtune.cli
runner = CliRunner()


def _write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_no_planted_structured_identifier_survives(tmp_path: Path) -> None:
    texts = generate_labelled_texts(15, seed=11)
    records: list[dict[str, object]] = [
        {"id": i, "text": t.text, "meta": {"domain": t.domain}, "score": 0.5} for i, t in enumerate(texts)
    ]
    src, out, report = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "report.json"
    _write_jsonl(src, records)
    result = runner.invoke(
        app, ["scrub", str(src), "--out", str(out), "--field", "text", "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    body = out.read_text(encoding="utf-8")
    planted = [t.value(s) for t in texts for s in t.pii if s.label in STRUCTURED]
    assert len(planted) > 100
    assert not [v for v in planted if v in body]
    rows = [json.loads(line) for line in body.splitlines()]
    assert [r["id"] for r in rows] == list(range(len(records)))
    assert all(r["meta"] == o["meta"] and r["score"] == 0.5 for r, o in zip(rows, records, strict=True))
    summary = json.loads(report.read_text(encoding="utf-8"))
    assert summary["records"] == len(records) and summary["counts"]["PERSON"] > 20
    assert not [v for v in planted if v in report.read_text(encoding="utf-8")]
    assert not list(tmp_path.glob(".*.tmp"))


def test_csv_in_csv_out_and_policy(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("0123456789abcdef0123456789abcdef\n")
    policy = tmp_path / "site.toml"
    policy.write_text(
        '[site]\nname = "a"\n[data]\npath = "x.jsonl"\ntext-fields = ["note"]\n[model]\npath = "m"\n'
        '[pii]\noperator = "pseudonym"\npseudonym-key-file = "key"\n'
    )
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text('id,note,code\n1,Dr. Okafor called 617-382-0142,A1\n2,"Mrs. Okafor, SSN 214-58-3391",B2\n')
    result = runner.invoke(app, ["scrub", str(src), "--out", str(out), "--policy", str(policy)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["code"] for r in rows] == ["A1", "B2"] and [r["id"] for r in rows] == ["1", "2"]
    assert "Okafor" not in out.read_text() and "3391" not in out.read_text()
    assert rows[0]["note"].split()[1] == rows[1]["note"].split()[1].rstrip(",")  # same surrogate


def test_bad_input_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n\n{"text": 12}\n', encoding="utf-8")
    result = runner.invoke(app, ["scrub", str(src), "--out", str(tmp_path / "o.jsonl"), "--field", "text"])
    assert isinstance(result.exception, DataError)
    assert result.exception.line == 3 and "bad.jsonl:3" in str(result.exception)
    src.write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    result = runner.invoke(app, ["scrub", str(src), "--out", str(tmp_path / "o.jsonl"), "--field", "text"])
    assert isinstance(result.exception, DataError) and result.exception.line == 2
    result = runner.invoke(app, ["scrub", str(src), "--out", str(tmp_path / "o.jsonl"), "--field", "body"])
    assert isinstance(result.exception, DataError)
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "Email jo.kim@example.org", "n": 3}]), src)
    result = runner.invoke(app, ["scrub", str(src), "--out", str(out), "--field", "text"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).to_pylist() == [{"text": "Email <EMAIL>", "n": 3}]
