"""docs/bad-inputs.md shows exactly the messages fedtune gives today."""

from __future__ import annotations

from pathlib import Path

from tests.bad_inputs import table

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


def test_the_documented_table_is_what_the_code_says() -> None:
    doc = DOC.read_text(encoding="utf-8")
    rows = table().splitlines()
    missing = [row for row in rows if row not in doc]
    assert not missing, (
        "docs/bad-inputs.md is stale; regenerate with python -m tests.bad_inputs:\n" + "\n".join(missing)
    )
    assert len(rows) > 25
