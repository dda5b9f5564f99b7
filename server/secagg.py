"""One training round aggregated with Flower's SecAgg+, so the coordinator sees only the sum.

Flower 1.42 has SecAgg+ only in its legacy workflow API: ``SecAggPlusWorkflow`` driven
through a ``LegacyContext`` whose strategy is a legacy ``flwr.server.strategy`` Strategy,
with ``secaggplus_mod`` at the sites (client/client_app.py). ``secagg_train_round`` runs
that workflow for one round: a small legacy strategy sends our train request and the
global adapter as legacy ``FitIns``; each site trains with its usual ``SiteAgent`` and
returns its update delta, which Flower clips to +-``secagg-clip-range``, quantizes, masks
and sums; the coordinator unmasks only the num-examples-weighted sum. No individual
update is ever visible here, so none can be validated here (see docs/secagg.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, NDArrays, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.proto.node_pb2 import NodeInfo
from flwr.server import ClientManager, LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.config import MODULUS, RunConfig
from common.errors import ConfigError
from server.replies import SiteReply, parse_train

log = logging.getLogger(__name__)
SECAGG_KEYS = "secagg-keys"  # fitins config: global tensor names in Parameters order (client_app.py)
MAX_WEIGHT = 1000.0  # Flower's default: weights (num-examples) are scaled by 1/MAX_WEIGHT before masking


def check_secagg(cfg: RunConfig, num_sites: int) -> None:
    """Raise ``ConfigError`` when SecAgg+ cannot work with ``num_sites`` (the rest: ``RunConfig``)."""
    sa = cfg.secagg
    problems = []
    if num_sites < sa.threshold:
        problems.append(
            f"{num_sites} site(s) take part but 'secagg-threshold' is {sa.threshold}: lower the threshold "
            "or add sites"
        )
    if num_sites * sa.quantization >= MODULUS:
        problems.append(
            f"{num_sites} sites x 'secagg-quantization' {sa.quantization} overflow the 2**32 mask modulus: "
            "lower 'secagg-quantization'"
        )
    if problems:
        raise ConfigError("run config", problems)


class MeteredGrid(Grid):
    """A ``Grid`` that counts the record bytes of what passes ``send_and_receive``.

    Sizes follow Flower's ``count_bytes`` (see ``message_bytes``); ``exchanges`` keeps every
    (sent, replies) batch when ``keep`` is true.
    """

    def __init__(self, inner: Grid, *, keep: bool = False) -> None:
        self.inner = inner
        self.keep = keep
        self.bytes_sent = 0
        self.bytes_received = 0
        self.exchanges: list[tuple[list[Message], list[Message]]] = []

    def set_run(self, run: Run) -> None:
        """Delegate."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegate."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegate."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Delegate."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate (not metered)."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate (not metered)."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait for the replies, count both directions."""
        sent = list(messages)
        self.bytes_sent += sum(message_bytes(m) for m in sent)
        replies = list(self.inner.send_and_receive(sent, timeout=timeout))
        self.bytes_received += sum(message_bytes(m) for m in replies)
        if self.keep:
            self.exchanges.append((sent, replies))
        return replies


def message_bytes(msg: Message) -> int:
    """Payload bytes of a message's records (0 for an error reply).

    Flower's ``count_bytes`` rules (array data, 8 per number, 1 per bool, text/bytes length,
    plus key names; protobuf framing excluded), but tolerant of empty text and empty lists.
    """
    if not msg.has_content():
        return 0
    total = 0
    for record in msg.content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        else:
            total += sum(len(k) + _value_bytes(v) for k, v in record.items())
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, (str, bytes)):
        return len(value)
    return 1 if isinstance(value, bool) else 8


class _RoundStrategy(FedAvg):
    """Legacy strategy for one SecAgg+ round: fixed sites and config; keeps the unmasked aggregate."""

    def __init__(self, grid: Grid, node_ids: Sequence[int], config: dict[str, Scalar]) -> None:
        super().__init__(accept_failures=True)
        self.grid, self.node_ids, self.config = grid, list(node_ids), config
        self.aggregate: NDArrays | None = None
        self.weights: list[int] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every chosen site gets the global adapter and the train request."""
        # the workflow reads only the proxies' node ids; it messages the sites itself
        return [
            (GridClientProxy(n, self.grid, 0), FitIns(parameters, dict(self.config))) for n in self.node_ids
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Every result carries the same unmasked weighted average (SecAggPlusWorkflow sets it)."""
        self.weights = [res.num_examples for _, res in results]
        if not results or sum(self.weights) <= 0:
            return None, {}
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}


def secagg_train_round(
    grid: Grid,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    request: ConfigRecord,
    node_ids: Sequence[int],
    *,
    names: Mapping[str, str] | None = None,
    max_weight: float = MAX_WEIGHT,
) -> tuple[ArrayRecord | None, list[SiteReply]]:
    """Run one SecAgg+ training round with ``node_ids``; return the new update keys and the sites' rows.

    The new global values of the trained keys (all LoRA keys, or B only under FFA-LoRA) are
    ``arrays + sum_i w_i delta_i / sum_i w_i`` with ``w_i`` = num-examples, or None when no
    site trained or the protocol halted (fewer than ``secagg-threshold`` sites left). Rows
    carry each site's metrics and ledger receipt; a receipt's ``update_sha256`` cannot be
    checked against a masked update. ``names`` maps node ids to site names seen before (for
    sites whose error reply carries none); ``max_weight`` should be >= the largest num-examples.
    """
    nodes = list(node_ids)
    check_secagg(cfg, len(nodes))
    if server_round == 1 and (cfg.aggregation.max_update_norm > 0 or cfg.aggregation.update_norm_ratio > 0):
        log.info(
            "SecAgg+: per-update checks (max-update-norm, update-norm-ratio, receipts) need the "
            "individual updates and are not applied; each update is clipped at its site instead"
        )
    tensors = list(arrays.keys())
    keys = cfg.lora.update_keys(tensors)
    config = {k: cast(Scalar, v) for k, v in request.items()} | {SECAGG_KEYS: ",".join(tensors)}
    tap = MeteredGrid(grid, keep=True)
    strategy = _RoundStrategy(tap, nodes, config)
    ctx = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=strategy)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = arrays
    workflow = SecAggPlusWorkflow(
        cfg.secagg.shares,
        cfg.secagg.threshold,
        max_weight=max_weight,
        clipping_range=cfg.secagg.clip_range,
        quantization_range=cfg.secagg.quantization,
        modulus_range=MODULUS,
        timeout=cfg.round_timeout,
    )
    with np.errstate(divide="ignore", invalid="ignore"):  # all weights 0 (every site refused): 0/0,
        workflow(tap, ctx)  # which _RoundStrategy discards; any other non-finite aggregate is refused below
    rows = site_rows(server_round, nodes, tap.exchanges, names)
    new = _new_global(server_round, arrays, keys, strategy, max_weight, cfg)
    if new is None:
        for r in rows:
            if r.status == "trained":
                r.reason = "SecAgg+ produced no aggregate this round; the update was not used"
    return new, rows


def site_rows(
    server_round: int,
    node_ids: Sequence[int],
    exchanges: list[tuple[list[Message], list[Message]]],
    names: Mapping[str, str] | None = None,
) -> list[SiteReply]:
    """What every site answered, read from the protocol's messages (status per the collect stage)."""
    rows: dict[int, SiteReply] = {}
    for sent, replies in exchanges:
        stage = _stage(sent)
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                info = parse_train(msg).row
                info.reason = f"SecAgg+ {stage} stage: {info.reason}"
                rows.setdefault(node, info)
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                info = parse_train(msg, legacy=True).row
                masked = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
                info.bytes_up = sum(len(b) for b in cast(list[bytes], masked))
                rows[node] = info
        for m in sent:
            node = m.metadata.dst_node_id
            if node not in answered:
                rows.setdefault(
                    node, SiteReply(node, f"node-{node}", "failed", f"no reply in the SecAgg+ {stage} stage")
                )
    out = [
        rows.get(n)
        or SiteReply(n, f"node-{n}", "failed", "the SecAgg+ round halted before this site could train")
        for n in node_ids
    ]
    for info in out:
        if info.site.startswith("node-") and names:
            info.site = names.get(str(info.node_id), info.site)
        if info.status != "trained":
            log.warning("round %d: site %s %s: %s", server_round, info.site, info.status, info.reason)
    return out


def _stage(sent: list[Message]) -> str:
    for m in sent:
        rec = m.content.config_records.get(RECORD_KEY_CONFIGS)
        if rec is not None and Key.STAGE in rec:
            return str(rec[Key.STAGE])
    return "unknown"


def _new_global(
    server_round: int,
    arrays: ArrayRecord,
    keys: list[str],
    strategy: _RoundStrategy,
    max_weight: float,
    cfg: RunConfig,
) -> ArrayRecord | None:
    """Global + the unmasked weighted average delta, or None (with the reason logged)."""
    agg, weights = strategy.aggregate, strategy.weights
    if agg is None:
        log.warning("round %d: SecAgg+ gave no aggregate; the global adapter is unchanged", server_round)
        return None
    if any(w > max_weight for w in weights):
        log.warning(
            "round %d: num-examples %d > max_weight %g: that site's update was clipped at "
            "+-%g instead of +-%g",
            server_round,
            max(weights),
            max_weight,
            cfg.secagg.clip_range * max_weight / max(weights),
            cfg.secagg.clip_range,
        )
    if sum(round(w / max_weight * cfg.secagg.quantization) for w in weights) >= MODULUS:
        log.error(
            "round %d: the SecAgg+ weights overflowed the mask modulus; aggregate dropped", server_round
        )
        return None
    if len(agg) != len(keys):
        log.error(
            "round %d: SecAgg+ aggregate has %d tensors, expected %d", server_round, len(agg), len(keys)
        )
        return None
    out: dict[str, Any] = {}
    for key, delta in zip(keys, agg, strict=True):
        base = arrays[key].numpy()
        if delta.shape != base.shape or not np.isfinite(delta).all():
            log.error("round %d: SecAgg+ aggregate of '%s' is malformed; dropped", server_round, key)
            return None
        out[key] = Array((base.astype(np.float64) + delta).astype(base.dtype))
    return ArrayRecord(out)
