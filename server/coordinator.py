"""The coordinator's run: one explicit round loop over a Flower strategy.

Per round: send the global adapter and the training request, triage and aggregate
replies, evaluate the new global adapter at every site, append one line to
``metrics.jsonl``. At the end: a standard PEFT adapter folder and ``summary.json``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from common.arrays import ArraySpec, payload_bytes, spec_of, to_record
from common.config import RunConfig, TrainRequest
from common.errors import ConfigError
from common.modeling import base_bytes, check_model_dir, fresh_adapter, meta_peft_model, model_fingerprint
from common.runfolder import RunFolder
from privacy.receipts import receipt_line
from server.checkpoint import (
    CheckpointError,
    CoordinatorState,
    capture_rng,
    checkpoints,
    config_drift,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from server.export import write_adapter
from server.registry import FEDERATION_NAME, SiteRegistry, load_site_keys
from server.replies import SiteReply
from server.rounds import make_round, pull_each
from server.strategy import Guard, SiteLevelDP, UpdateRules, build_strategy

log = logging.getLogger(__name__)
RoundCallback = Callable[[dict[str, Any]], None]
# an evaluate reply's metrics kept per site: the loss, its bounded sample and error, a dpo run's rewards
EVAL_KEYS = ("eval-loss", "eval-records", "eval-loss-stderr", "reward-margin", "reward-accuracy")


def initial_adapter(cfg: RunConfig) -> tuple[ArrayRecord, int]:
    """The round-0 global adapter (LoRA B = 0, so it starts as the base model) and the base's size.

    Built from the model's config on the meta device: the coordinator never holds the base weights.
    """
    model = meta_peft_model(check_model_dir(cfg.model_dir, "model-dir"), cfg.lora)
    return to_record(fresh_adapter(model, seed=0)), base_bytes(model)


def _site_rows(train: list[SiteReply], evaluate: list[SiteReply]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for r in train:
        rows[r.site] = {"status": r.status, "reason": r.reason, **r.metrics, "bytes-up": r.bytes_up}
    for r in evaluate:
        row = rows.setdefault(r.site, {})
        for key in EVAL_KEYS:
            if key in r.metrics:
                row[key] = r.metrics[key]
    return rows


def federation_file(cfg: RunConfig) -> Path:
    """Where the federation's record of sites lives (kept across runs)."""
    root = Path(cfg.federation_dir) if cfg.federation_dir else Path(cfg.out_dir).resolve().parent
    return root / FEDERATION_NAME


def run_federation(
    grid: Grid, run_config: Mapping[str, Any], on_round: RoundCallback | None = None
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) a federation and write the run folder; return the summary."""
    cfg = RunConfig.from_flower(run_config)  # every key and cross-key rule, before anything starts
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = RunFolder(out)
    fingerprint = model_fingerprint(check_model_dir(cfg.model_dir, "model-dir"))
    initial, base_size = initial_adapter(cfg)
    state = _start(cfg, dict(run_config), out, initial)
    registry = SiteRegistry(federation_file(cfg), state.names, load_site_keys(cfg.site_keys))
    update_keys = cfg.lora.update_keys(state.arrays)
    wire = cfg.train.wire_dtype  # the precision updates travel in (the global adapter stays float32)
    template = {k: ArraySpec(v.shape, wire) for k, v in spec_of(state.arrays).items() if k in update_keys}
    site_dp = _site_dp(cfg)
    sites_expected = max(cfg.aggregation.min_train_sites, len(list(grid.get_node_ids())))
    inner, dp_wrapper = build_strategy(
        min_sites=cfg.aggregation.min_train_sites,
        fraction_train=cfg.aggregation.fraction_train,
        sites_expected=sites_expected,
        site_dp=site_dp,
        aggregation=cfg.aggregation.method,
        trim_beta=cfg.aggregation.trim_beta,
    )
    rules = UpdateRules(
        template, state.run_id, cfg.aggregation.max_update_norm, cfg.aggregation.update_norm_ratio,
        weighting=cfg.aggregation.weighting, max_weight_share=cfg.aggregation.max_weight_share,
        train_kind=cfg.train.train_kind,
    )  # fmt: skip
    strategy = Guard(inner, rules, registry, equal_weights=site_dp is not None)
    train_round = make_round(grid, strategy, cfg)
    if dp_wrapper is not None and dp_wrapper.accountant is not None and state.site_dp_releases:
        event = GaussianPrivacyEvent(cfg.site_dp.noise, sites_expected, sites_expected)
        dp_wrapper.accountant.compose(event, count=state.site_dp_releases)
    stop_reason = ""
    t0 = time.time() - state.elapsed
    for rnd in range(state.server_round + 1, cfg.num_server_rounds + 1):
        connected = _wait_for_sites(grid, cfg.aggregation.min_train_sites, cfg.round_timeout)
        if connected < cfg.aggregation.min_train_sites:
            stop_reason = (
                f"round {rnd}: only {connected} site(s) connected within round-timeout="
                f"{cfg.round_timeout:g}s, min-train-sites is {cfg.aggregation.min_train_sites}"
            )
            break
        req = TrainRequest.build(cfg, server_round=rnd, run_id=state.run_id, fingerprint=fingerprint)
        arrays, request = state.arrays, ConfigRecord(req.to_record())
        result = train_round(rnd, arrays, request)
        train_infos, new_arrays, down = result.rows, result.arrays, result.bytes_down
        for r in train_infos:
            merge_site(state.sites, r, rnd)
        answered = [r for r in train_infos if r.status in ("trained", "refused") and r.receipt]
        run.append_receipts(receipt_line(r.site, r.receipt) for r in answered)  # the auditor's cross-check
        registry.save()
        up = sum(r.bytes_up for r in train_infos)
        state.totals["bytes_up"] += up
        if result.failure or result.accepted < cfg.aggregation.min_train_sites:
            need = cfg.aggregation.min_train_sites
            too_few = f"{result.accepted} update(s) accepted, fewer than min-train-sites={need}"
            stop_reason = f"round {rnd}: {result.failure or too_few}"
            stop_reason += f"; the global adapter stays at round {state.adapter_round}"
            state.totals["bytes_down"] += down
            run.append_metrics(_round_line(rnd, t0, down, up, False, train_infos, [], stop_reason))
            _checkpoint(out, state, rnd, t0, dp_wrapper)  # round numbers once sent are never reused
            break
        if new_arrays is not None:  # under FFA-LoRA only B is averaged; A stays the shared init
            arrays = ArrayRecord({**arrays, **new_arrays})
        last = rnd == cfg.num_server_rounds
        full = cfg.eval_full == "every-round" or (cfg.eval_full == "last-round" and last)
        ask = ConfigRecord({**request, "eval-full": True}) if full else request  # the site's policy decides
        eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ask, grid))
        down += payload_bytes(arrays) * len(eval_msgs)
        eval_replies: list[Message] = []
        pull_each(grid, eval_msgs, cfg.round_timeout, eval_replies.append)  # small: no update in them
        strategy.aggregate_evaluate(rnd, eval_replies)
        eval_infos = strategy.rows
        state.totals["bytes_down"] += down
        for r in eval_infos:
            for key in EVAL_KEYS:
                if key in r.metrics:
                    state.sites.setdefault(r.site, {})[f"{key.replace('-', '_')}_after"] = r.metrics[key]
        line = _round_line(rnd, t0, down, up, new_arrays is not None, train_infos, eval_infos)
        run.append_metrics(line)
        state.arrays, state.adapter_round = arrays, rnd
        _checkpoint(out, state, rnd, t0, dp_wrapper)
        log.info(
            "round %d/%d done: %s",
            rnd,
            cfg.num_server_rounds,
            {s: v.get("status") for s, v in line["sites"].items()},
        )
        if on_round is not None:
            on_round(line)
        if strategy.failure:  # the evaluation's aggregation failed
            stop_reason = f"round {rnd}: {strategy.failure}"
            break
    if stop_reason:
        log.error(
            "run stopped: %s. The checkpoint of round %d is kept: resume with resume=true once "
            "the cause is fixed",
            stop_reason,
            state.server_round,
        )
    write_adapter(cfg, state.arrays, run.adapter)
    summary = {
        "run_id": state.run_id,
        "rounds": state.server_round,
        "adapter_round": state.adapter_round,
        "rounds_planned": cfg.num_server_rounds,
        "status": "stopped" if stop_reason else "completed",
        "stop_reason": stop_reason,
        "base_model": {
            "path": str(Path(cfg.model_dir).resolve()),
            "fingerprint": fingerprint,
            "bytes": base_size,
        },
        "adapter_bytes": payload_bytes(state.arrays),
        **state.totals,
        "sites": dict(sorted(state.sites.items())),
        "flags": registry.snapshot(),
        "site_level_dp": _site_dp_summary(site_dp, dp_wrapper),
        "wall_seconds": round(time.time() - t0, 1),
    }
    run.write_summary(summary)
    return summary


def _start(cfg: RunConfig, run_config: dict[str, Any], out: Path, initial: ArrayRecord) -> CoordinatorState:
    """A fresh run's state, or the interrupted run's from its newest good checkpoint."""
    if not cfg.resume:
        if checkpoints(out):
            raise ConfigError(
                "run config",
                [
                    f"out-dir '{out}' already holds a run's checkpoints: set resume=true to continue it, "
                    "or choose a new out-dir"
                ],
            )
        RunFolder(out).write_metrics([])
        totals = {"bytes_down": 0, "bytes_up": 0}
        return CoordinatorState(uuid.uuid4().hex[:12], 0, initial, run_config, totals=totals)
    state = latest_checkpoint(out)
    drift = config_drift(state.run_config, run_config)
    if drift:
        raise ConfigError("run config", [*drift, "resume with the interrupted run's run config"])
    if state.arrays.keys() != initial.keys():
        raise CheckpointError(f"{out}: the checkpointed adapter's tensors differ from this run's LoRA layout")
    restore_rng(state.rng)
    run = RunFolder(out)
    run.summary.unlink(missing_ok=True)  # the run is in progress again
    run.write_metrics(line for line in run.read_metrics() if line.get("round", 0) <= state.server_round)
    log.warning(
        "resuming run %s after round %d of %d", state.run_id, state.server_round, cfg.num_server_rounds
    )
    return state


def _wait_for_sites(grid: Grid, wanted: int, timeout: float) -> int:
    """Connected sites, after waiting up to ``timeout`` seconds for ``wanted`` of them."""
    deadline = time.time() + timeout
    while (n := len(list(grid.get_node_ids()))) < wanted and time.time() < deadline:
        time.sleep(1.0)
    return n


def _round_line(
    rnd: int,
    t0: float,
    down: int,
    up: int,
    updated: bool,
    train: list[SiteReply],
    evaluate: list[SiteReply],
    stopped: str = "",
) -> dict[str, Any]:
    line = {
        "round": rnd,
        "time": round(time.time() - t0, 2),
        "bytes_down": down,
        "bytes_up": up,
        "updated": updated,
        "sites": _site_rows(train, evaluate),
    }
    return line | ({"stopped": stopped} if stopped else {})


def _checkpoint(out: Path, state: CoordinatorState, rnd: int, t0: float, dp_wrapper: Any) -> None:
    """Record that round ``rnd`` was asked of the sites, and everything needed to go on after it."""
    spent = dp_wrapper.privacy_spent() if dp_wrapper is not None else None
    state.server_round = rnd
    state.elapsed = time.time() - t0
    state.site_dp_releases = int(spent.num_releases) if spent else 0
    state.rng = capture_rng()
    save_checkpoint(out, state)


def _site_dp(cfg: RunConfig) -> SiteLevelDP | None:
    """The site-level DP settings of a run (None when off)."""
    sd = cfg.site_dp
    return SiteLevelDP(sd.noise, sd.clip, sd.delta) if sd.noise > 0 else None


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
