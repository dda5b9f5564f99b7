"""The local-only baseline: each site trains alone with the same SiteAgent, no Flower."""

from __future__ import annotations

import json
from pathlib import Path

from embedded.synthdata import generate_site_records
from fedtune.local import run_local
from fedtune.simulate import prepare_run


def test_each_site_trains_alone_within_its_budget(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        records, _ = generate_site_records(i, 40, seed=3)
        (data / f"site{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "run"
    policies = prepare_run(out, sites=2, model=tiny_model, data=data, max_epsilon=8.0, delta=1e-5)
    summary = run_local(
        policies,
        {
            "model-dir": str(tiny_model),
            "out-dir": str(out),
            "num-server-rounds": 2,
            "local-steps": 5,
            "batch-size": 6,
            "max-seq-len": 128,
        },
    )
    assert summary["mode"] == "local-only" and sorted(summary["sites"]) == ["site0", "site1"]
    for name, site in summary["sites"].items():
        assert site["rounds_trained"] == 2 and site["refusals"] == [], name
        assert 0 < site["epsilon"] <= 8.0
        assert site["eval_loss_after"] < site["eval_loss_before"]
        assert site["num_examples"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and set(lines[1]["sites"]) == {"site0", "site1"}
