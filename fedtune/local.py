"""Local-only baseline: every site trains alone, with the same budget, rounds and code.

The comparison point for federation: the same ``SiteAgent`` answers the same training
requests, but each site's "global" adapter is only ever its own last update. No Flower,
no coordinator; run folder and summary have the same shape as ``fedtune simulate``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.policy import load_policy
from client.site import SiteAgent
from common.arrays import payload_bytes
from common.config import RunConfig, TrainRequest
from common.modeling import model_fingerprint
from common.runfolder import RunFolder
from server.coordinator import initial_adapter, merge_site
from server.strategy import SiteReply


def run_local(policies: list[Path], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Train each site alone for ``num-server-rounds`` rounds; write and return the summary."""
    cfg = RunConfig.from_flower(run_config)
    out = Path(cfg.out_dir)
    start, base_bytes = initial_adapter(cfg)
    fingerprint = model_fingerprint(cfg.model_dir)
    run_id = uuid.uuid4().hex[:12]
    sites: dict[str, dict[str, Any]] = {}
    lines: list[dict[str, Any]] = [{"round": r, "sites": {}} for r in range(1, cfg.num_server_rounds + 1)]
    for path in policies:
        agent = SiteAgent(load_policy(path))
        arrays = start
        name = agent.policy.name
        for rnd in range(1, cfg.num_server_rounds + 1):
            req = TrainRequest.build(cfg, server_round=rnd, run_id=run_id, fingerprint=fingerprint)
            outcome = agent.train_round(arrays, req)
            if outcome.trained and outcome.arrays is not None:
                arrays = type(arrays)({**arrays, **outcome.arrays})
            status = "trained" if outcome.trained else "refused"
            metrics = {"num-examples": float(outcome.num_examples), **outcome.metrics}
            merge_site(sites, SiteReply(0, name, status, outcome.reason, metrics, outcome.scrub_counts), rnd)
            loss = agent.evaluate(arrays, req)[0]["eval-loss"]
            sites[name]["eval_loss_after"] = loss
            lines[rnd - 1]["sites"][name] = {"status": status, "eval-loss": loss, **outcome.metrics}
        sites[name]["num_examples"] = len(agent.data().train)
    run = RunFolder(out)
    run.write_metrics(lines)
    summary = {
        "run_id": run_id,
        "mode": "local-only",
        "rounds": cfg.num_server_rounds,
        "base_model": {
            "path": str(Path(cfg.model_dir).resolve()),
            "fingerprint": fingerprint,
            "bytes": base_bytes,
        },
        "adapter_bytes": payload_bytes(start),
        "bytes_down": 0,
        "bytes_up": 0,
        "sites": dict(sorted(sites.items())),
    }
    run.write_summary(summary)
    return summary
