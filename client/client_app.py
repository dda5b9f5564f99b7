"""ClientApp wiring: Flower messages in, ``SiteAgent`` calls, Flower messages out.

Reply layout (train): ``arrays`` (LoRA tensors only), ``metrics`` (num-examples, loss,
epsilon...), ``site`` (name, status, reason, the ledger's public key), ``scrub`` (PII counts
per entity type, never values) and ``receipt`` (the ledger entry that answered the request,
as written and signed, under ``entry``). A refusal carries no arrays. Errors the site admin
must fix (bad data, bad policy, a ledger that fails its checks) come back as Flower error
replies naming the file and the fix.

The site reads nothing of the coordinator's run config but ``sim-policies`` (simulation only:
which policy a simulated node runs); everything else comes in the request, checked by the site.

Under SecAgg+ (run config ``secagg``) the coordinator speaks Flower's legacy SecAgg+
protocol: four train messages per round carrying ``secaggplus_configs``. They go through
Flower's ``secaggplus_mod``; in its collect stage the very same ``SiteAgent.train_round``
runs and its update leaves only as a masked, quantized legacy ``FitRes`` (see docs/secagg.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.outcome import RoundOutcome
from client.worker import WorkerClient
from common.config import NodeConfig, TrainRequest
from common.errors import ConfigError, FedtuneError, PolicyViolationError
from common.modeling import set_offline_env

set_offline_env()
log = logging.getLogger(__name__)
ERROR_CODE = 4001  # a site-side problem the site admin must fix
# fitins config key naming the global adapter's tensors in legacy Parameters order (server/secagg.py)
SECAGG_KEYS = "secagg-keys"
TrainFn = Callable[[ArrayRecord, Mapping[str, Any]], RoundOutcome]


def _node(context: Context, overrides: Mapping[str, Any]) -> NodeConfig:
    sim = {**context.run_config, **overrides}.get("sim-policies", "")
    return NodeConfig.from_flower(context.node_config, sim if isinstance(sim, str) else "")


def _agent(node: NodeConfig) -> Any:
    """The in-process site agent (imported here: a ClientApp that forwards to a worker stays light)."""
    from client.policy import load_policy
    from client.site import get_agent

    return get_agent(load_policy(node.policy))


def _error(msg: Message, exc: Exception) -> Message:
    log.error("site error: %s", exc)
    return Message(Error(code=ERROR_CODE, reason=str(exc)), reply_to=msg)


def reply_records(out: RoundOutcome) -> RecordDict:
    """The ``metrics``, ``site``, ``scrub`` and ``receipt`` records of a train reply (both paths)."""
    status = "trained" if out.trained else "refused"
    site: dict[str, Any] = {"name": out.site, "status": status, "reason": out.reason, "key": out.public_key}
    if out.train_kind:
        site["train-kind"] = out.train_kind
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": out.num_examples, **out.metrics}),
            "site": ConfigRecord(site),
            "scrub": ConfigRecord(dict(out.scrub_counts)),
        }
    )
    if out.receipt:
        content["receipt"] = ConfigRecord(
            {"entry": json.dumps(out.receipt, sort_keys=True, separators=(",", ":"))}
        )
    return content


def handle_train(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    """Train one round at this site, or refuse with the reason."""

    def train(arrays: ArrayRecord, request: Mapping[str, Any]) -> RoundOutcome:
        node = _node(context, overrides)
        if node.worker:
            return WorkerClient(node.worker).train(arrays, request)
        return cast(RoundOutcome, _agent(node).train_round(arrays, request))

    return train_reply(msg, context, train)


def train_reply(msg: Message, context: Context, train: TrainFn) -> Message:
    """Answer a train message with ``train``: plain Message API, or a SecAgg+ stage."""
    if is_secagg(msg):
        return handle_secagg(msg, context, train)
    try:
        config, arrays = msg.content.config_records.get("config"), msg.content.array_records.get("arrays")
        if config is None or arrays is None:
            raise PolicyViolationError(
                "the coordinator's train message lacks its 'config' or 'arrays' record"
            )
        out = train(arrays, dict(config))
    except FedtuneError as exc:
        return _error(msg, exc)
    content = reply_records(out)
    if out.arrays is not None:
        content["arrays"] = out.arrays
    return Message(content, reply_to=msg)


def is_secagg(msg: Message) -> bool:
    """True for a stage message of Flower's SecAgg+ protocol."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def handle_secagg(msg: Message, context: Context, train: TrainFn) -> Message:
    """One SecAgg+ stage at this site, run by Flower's ``secaggplus_mod``.

    Only the collect-masked-vectors stage trains (``train``, i.e. ``SiteAgent.train_round``);
    the mod quantizes, clips to +-clipping-range and masks the returned update before it
    leaves. Site errors come back as error replies (the coordinator treats them as a dropout).
    """
    inside_fit = False

    def fit(m: Message, _: Context) -> Message:
        nonlocal inside_fit
        inside_fit = True
        reply = Message(legacy_fit(m.content, train), reply_to=m)
        inside_fit = False
        return reply

    try:
        return secaggplus_mod(msg, context, fit)
    except FedtuneError as exc:
        return _error(msg, exc)
    except (KeyError, TypeError, ValueError) as exc:  # the mod's own protocol checks
        if inside_fit:
            raise
        return _error(msg, FedtuneError(f"SecAgg+ protocol aborted at this site: {exc}"))


def legacy_fit(content: RecordDict, train: TrainFn) -> RecordDict:
    """Legacy ``FitIns`` in, legacy ``FitRes`` (+ the usual reply records) out.

    The ``FitRes`` parameters are the update *deltas* (trained - global) of the keys the
    site trains, in the global adapter's order, weighted by num-examples (0 for a refusal,
    whose delta is zero): the coordinator adds their weighted average to the global adapter.
    """
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    names = str(config.pop(SECAGG_KEYS, "")).split(",")
    values = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(values):
        raise PolicyViolationError(
            f"the coordinator's SecAgg+ request names {len(names)} tensors but sends {len(values)}"
        )
    global_arrays = ArrayRecord({n: Array(v) for n, v in zip(names, values, strict=True)})
    out = train(global_arrays, config)
    try:
        keys = TrainRequest.from_record(config).lora.update_keys(names)
    except ConfigError:  # refused by the site already: a zero delta of every tensor
        keys = names
    if out.arrays is None:
        deltas = [np.zeros_like(global_arrays[k].numpy()) for k in keys]
    else:
        deltas = [out.arrays[k].numpy() - global_arrays[k].numpy() for k in keys]
    weight = out.num_examples if out.trained else 0
    fitres = FitRes(Status(Code.OK, out.reason), ndarrays_to_parameters(deltas), weight, {})
    reply = compat.fitres_to_recorddict(fitres, keep_input=False)
    for name, record in reply_records(out).items():
        reply[name] = record
    return reply


def handle_evaluate(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    """Held-out loss of the global adapter at this site."""
    try:
        node = _node(context, overrides)
        config, arrays = msg.content.config_records.get("config"), msg.content.array_records.get("arrays")
        if config is None or arrays is None:
            raise PolicyViolationError(
                "the coordinator's evaluate message lacks its 'config' or 'arrays' record"
            )
        if node.worker:
            metrics, n, name = WorkerClient(node.worker).evaluate(arrays, dict(config))
        else:
            agent = _agent(node)
            (metrics, n), name = agent.evaluate(arrays, dict(config)), agent.policy.name
    except FedtuneError as exc:
        return _error(msg, exc)
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord({**metrics, "num-examples": n}),
                "site": ConfigRecord({"name": name, "status": "evaluated"}),
            }
        ),
        reply_to=msg,
    )


def build_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated by ``overrides``."""
    extra = dict(overrides or {})
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, extra)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, extra)

    return client


app = build_app()
