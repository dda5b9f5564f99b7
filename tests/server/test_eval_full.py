"""An operator's full evaluation on demand: asked by the run config, granted by each site's policy."""

from __future__ import annotations

import json
from pathlib import Path

from server.coordinator import run_federation
from tests.inprocess import InProcessGrid, federation


def test_the_last_round_scores_every_held_out_record_where_the_site_allows_it(
    tmp_path: Path, tiny_model: Path, site_data: Path
) -> None:
    cfg, names = federation(
        tmp_path / "run", tiny_model, site_data, 2,
        **{"num-server-rounds": 2, "local-steps": 1, "max-seq-len": 64, "eval-full": "last-round"},
    )  # fmt: skip
    for name, allow in zip(names, ("true", "false"), strict=True):
        policy = tmp_path / "run" / "sites" / name / "policy.toml"
        text = policy.read_text()
        edited = text.replace("max-records = 256", "max-records = 2").replace(
            "allow-full-on-request = false", f"allow-full-on-request = {allow}"
        )
        assert edited.count("max-records = 2\n") == 1 and f"allow-full-on-request = {allow}" in edited
        policy.write_text(edited)
    run_federation(InProcessGrid(2, cfg), cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [{s: row["eval-records"] for s, row in line["sites"].items()} for line in lines]
    allowed, bounded = names
    assert scored[0] == {allowed: 2, bounded: 2}  # round 1: every site's own bound
    assert scored[1][bounded] == 2  # it does not allow more: its policy wins
    assert scored[1][allowed] > 2  # it does: every held-out record
    for line in lines:
        assert all(row["eval-loss-stderr"] >= 0 for row in line["sites"].values())
