"""Bad site data fails before any training, naming file, line and fix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from client.data import is_eval, load_records, split_examples
from client.tokens import Example
from common.errors import DataError

FIELDS = ("instruction", "response")


def _jsonl(tmp_path: Path, lines: list[str], name: str = "site.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"instruction": "Summarize.", "response": "Stable."})


def test_good_file_loads_all_records(tmp_path: Path) -> None:
    assert len(load_records(_jsonl(tmp_path, [GOOD, GOOD, "", GOOD]), FIELDS)) == 3


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        ([GOOD, '{"instruction": "x", "response": ', GOOD], 2, ["not valid JSON", "Fix:"]),
        ([GOOD, GOOD, json.dumps({"instruction": "x"})], 3, ["no field 'response'", "text-fields"]),
        ([json.dumps({"instruction": "", "response": "y"})], 1, ["empty or not text"]),
        ([json.dumps(["a", "b"])], 1, ["expected a JSON object"]),
    ],
)
def test_bad_records_name_file_line_and_fix(
    tmp_path: Path, lines: list[str], line: int, words: list[str]
) -> None:
    path = _jsonl(tmp_path, lines)
    with pytest.raises(DataError) as err:
        load_records(path, FIELDS)
    assert err.value.line == line
    assert f"{path}:{line}" in str(err.value)
    for w in words:
        assert w in str(err.value)
    assert err.value.fix


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        load_records(path, FIELDS)


def test_bad_encoding_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="UTF-8") as err:
        load_records(path, FIELDS)
    assert err.value.line == 2


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl", FIELDS)
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(_jsonl(tmp_path, [GOOD], name="x.txt"), FIELDS)


def test_oversized_record_is_refused(tmp_path: Path) -> None:
    big = json.dumps({"instruction": "x" * 50, "response": "y" * 60})
    with pytest.raises(DataError, match="limit 100"):
        load_records(_jsonl(tmp_path, [big]), FIELDS, max_chars=100)


def test_csv_and_parquet_are_read(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(4)]
    c = tmp_path / "s.csv"
    with open(c, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(FIELDS))
        w.writeheader()
        w.writerows(rows)
    assert load_records(c, FIELDS) == rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    assert load_records(tmp_path / "s.parquet", FIELDS) == rows
    rows[2]["response"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as err:
        load_records(tmp_path / "bad.parquet", FIELDS)
    assert err.value.line == 3


def test_split_is_deterministic_and_disjoint() -> None:
    examples = [Example(f"note number {i}", "summary") for i in range(200)]
    train, held = split_examples(examples, 0.2)
    assert set(split_examples(list(reversed(examples)), 0.2)[1]) == set(held)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 200
    assert 20 <= len(held) <= 60
    assert all(is_eval(e.text, 0.2) for e in held)
