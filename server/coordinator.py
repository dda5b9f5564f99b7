"""The coordinator's run: one explicit round loop over a Flower strategy.

Per round: send the global adapter and the training request, triage and aggregate
replies, evaluate the new global adapter at every site, append one line to
``metrics.jsonl``. At the end: a standard PEFT adapter folder and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.arrays import payload_bytes, spec_of, to_record
from common.config import RunConfig, TrainRequest
from common.errors import ConfigError
from common.modeling import (
    adapter_state,
    check_model_dir,
    load_base_model,
    make_peft_model,
    model_fingerprint,
)
from server.export import write_adapter, write_summary
from server.strategy import (
    SiteLevelDP,
    SiteReply,
    UpdateRules,
    build_strategy,
    triage_evaluate,
    triage_train,
)

log = logging.getLogger(__name__)
RoundCallback = Callable[[dict[str, Any]], None]


def initial_adapter(cfg: RunConfig) -> tuple[ArrayRecord, int]:
    """The round-0 global adapter (LoRA B = 0, so it starts as the base model) and base size."""
    base = load_base_model(check_model_dir(cfg.model_dir, "model-dir"))
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = make_peft_model(base, cfg.lora)
    return to_record(adapter_state(model)), base_bytes


def _site_rows(train: list[SiteReply], evaluate: list[SiteReply]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for r in train:
        rows[r.site] = {"status": r.status, "reason": r.reason, **r.metrics, "bytes-up": r.bytes_up}
    for r in evaluate:
        row = rows.setdefault(r.site, {})
        if "eval-loss" in r.metrics:
            row["eval-loss"] = r.metrics["eval-loss"]
    return rows


def run_federation(
    grid: Grid, run_config: Mapping[str, Any], on_round: RoundCallback | None = None
) -> dict[str, Any]:
    """Run every round of a federation and write the run folder; return the summary."""
    cfg = RunConfig.from_flower(run_config)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    fingerprint = model_fingerprint(check_model_dir(cfg.model_dir, "model-dir"))
    arrays, base_bytes = initial_adapter(cfg)
    update_keys = cfg.lora.update_keys(arrays)
    template = {k: v for k, v in spec_of(arrays).items() if k in update_keys}
    site_dp = _site_dp(cfg)
    strategy, dp_wrapper = build_strategy(
        min_sites=cfg.min_train_sites,
        fraction_train=cfg.fraction_train,
        sites_expected=max(cfg.min_train_sites, len(list(grid.get_node_ids()))),
        site_dp=site_dp,
        aggregation=cfg.aggregation,
        trim_beta=cfg.trim_beta,
    )
    sites: dict[str, dict[str, Any]] = {}
    totals = {"bytes_down": 0, "bytes_up": 0}
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("", encoding="utf-8")
    t0 = time.time()
    for rnd in range(1, cfg.num_server_rounds + 1):
        req = TrainRequest.build(cfg, server_round=rnd, run_id=run_id, fingerprint=fingerprint)
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(req.to_record()), grid))
        down = payload_bytes(arrays) * len(messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        rules = UpdateRules(template, rnd, run_id, arrays, cfg.max_update_norm)
        accepted, train_infos = triage_train(rnd, replies, rules)
        new_arrays, _ = strategy.aggregate_train(rnd, accepted)
        if new_arrays is not None:  # under FFA-LoRA only B is averaged; A stays the shared init
            arrays = ArrayRecord({**arrays, **new_arrays})
        eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(req.to_record()), grid))
        down += payload_bytes(arrays) * len(eval_msgs)
        ok, eval_infos = triage_evaluate(rnd, grid.send_and_receive(eval_msgs, timeout=cfg.round_timeout))
        strategy.aggregate_evaluate(rnd, ok)
        up = sum(r.bytes_up for r in train_infos)
        totals["bytes_down"] += down
        totals["bytes_up"] += up
        rows = _site_rows(train_infos, eval_infos)
        for r in train_infos:
            merge_site(sites, r, rnd)
        _append_receipts(out / "receipts.jsonl", train_infos)
        for r in eval_infos:
            if "eval-loss" in r.metrics:
                sites.setdefault(r.site, {})["eval_loss_after"] = r.metrics["eval-loss"]
        line = {
            "round": rnd,
            "time": round(time.time() - t0, 2),
            "bytes_down": down,
            "bytes_up": up,
            "updated": new_arrays is not None,
            "sites": rows,
        }
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        log.info(
            "round %d/%d done: %s", rnd, cfg.num_server_rounds, {s: v.get("status") for s, v in rows.items()}
        )
        if on_round is not None:
            on_round(line)
    write_adapter(cfg, arrays, out / "adapter")
    summary = {
        "run_id": run_id,
        "rounds": cfg.num_server_rounds,
        "base_model": {
            "path": str(Path(cfg.model_dir).resolve()),
            "fingerprint": fingerprint,
            "bytes": base_bytes,
        },
        "adapter_bytes": payload_bytes(arrays),
        **totals,
        "sites": dict(sorted(sites.items())),
        "site_level_dp": _site_dp_summary(site_dp, dp_wrapper),
        "wall_seconds": round(time.time() - t0, 1),
    }
    write_summary(out / "summary.json", summary)
    return summary


def _site_dp(cfg: RunConfig) -> SiteLevelDP | None:
    """The site-level DP settings of a run (None when off)."""
    if cfg.site_dp_noise <= 0:
        return None
    if cfg.ffa_lora:
        raise ConfigError(
            "run config",
            [
                "'site-dp-noise' > 0 cannot be combined with 'ffa-lora' = true yet: Flower's clipping "
                "wrapper clips whole adapters; set one of them off"
            ],
        )
    return SiteLevelDP(cfg.site_dp_noise, cfg.site_dp_clip, cfg.site_dp_delta)


def _site_dp_summary(site_dp: SiteLevelDP | None, wrapper: Any) -> dict[str, Any] | None:
    """Site-level epsilon, reported apart from the sites' record-level epsilons."""
    if site_dp is None:
        return None
    spent = wrapper.privacy_spent()
    return {
        "noise_multiplier": site_dp.noise_multiplier,
        "clipping_norm": site_dp.clipping_norm,
        "epsilon": spent.epsilon if spent else 0.0,
        "delta": site_dp.delta,
        "releases": spent.num_releases if spent else 0,
        "accountant": "flwr RdpAccountant (no amplification, add/remove one site)",
    }


def _append_receipts(path: Path, replies: list[SiteReply]) -> None:
    """Keep every accepted site's signed ledger receipt (the auditor's cross-check)."""
    with open(path, "a", encoding="utf-8") as fh:
        for r in replies:
            if r.status == "trained" and "hash" in r.receipt:  # non-private rounds have no ledger entry
                fh.write(json.dumps({"site": r.site, **r.receipt}, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def merge_site(sites: dict[str, dict[str, Any]], r: SiteReply, rnd: int) -> None:
    """Fold one train reply into the per-site summary."""
    s = sites.setdefault(r.site, {"rounds_trained": 0, "refusals": [], "failures": []})
    s.setdefault("rounds_trained", 0)
    s.setdefault("refusals", [])
    s.setdefault("failures", [])
    m = r.metrics
    for key, name in (
        ("epsilon", "epsilon"),
        ("epsilon-rdp", "epsilon_rdp"),
        ("delta", "delta"),
        ("max-epsilon", "max_epsilon"),
        ("noise-multiplier", "noise_multiplier"),
    ):
        if key in m:
            s[name] = m[key]
    if r.status == "trained":
        s["rounds_trained"] += 1
        s.setdefault("eval_loss_before", m.get("eval-loss-before"))
        s["train_loss"] = m.get("train-loss")
        s["num_examples"] = int(m.get("num-examples", 0))
        if r.scrub:
            s["scrub"] = r.scrub
    elif r.status == "refused":
        s["refusals"].append({"round": rnd, "reason": r.reason})
    else:
        s["failures"].append({"round": rnd, "status": r.status, "reason": r.reason})
