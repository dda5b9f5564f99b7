"""docs/bad-inputs.md shows exactly the messages fedtune gives today, and none is a traceback."""

from __future__ import annotations

from pathlib import Path

from tests.bad_inputs import CASES, table

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
KINDS = {
    "site policy",
    "run config",
    "data",
    "state dir",
    "request",
    "ledger",
    "reply",
    "update",
    "audit",
    "CLI",
}


def test_the_documented_table_is_what_the_code_says(tiny_model: Path) -> None:
    doc = DOC.read_text(encoding="utf-8")
    rows = table(tiny_model).splitlines()
    missing = [row for row in rows if row not in doc]
    assert not missing, (
        "docs/bad-inputs.md is stale; regenerate with python -m tests.bad_inputs:\n" + "\n".join(missing)
    )
    assert len(rows) > 70
    assert not [row for row in rows if "Traceback" in row or 'File "' in row]
    assert {kind for kind, _, _ in CASES} >= KINDS
