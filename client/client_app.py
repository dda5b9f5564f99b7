"""ClientApp wiring: Flower messages in, ``SiteAgent`` calls, Flower messages out.

Reply layout (train): ``arrays`` (LoRA tensors only), ``metrics`` (num-examples, loss,
epsilon...), ``site`` (name, status, reason) and ``scrub`` (PII counts per entity
type, never values). A refusal carries no arrays. Errors the site admin must fix
(bad data, bad policy) come back as Flower error replies naming the file and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.policy import load_policy
from client.site import SiteAgent, get_agent
from common.config import NodeConfig, RunConfig, TrainRequest
from common.errors import FedtuneError
from common.modeling import set_offline_env

set_offline_env()
log = logging.getLogger(__name__)
ERROR_CODE = 4001  # a site-side problem the site admin must fix


def _agent(context: Context, overrides: Mapping[str, Any]) -> SiteAgent:
    run = RunConfig.from_flower({**context.run_config, **overrides})
    node = NodeConfig.from_flower(context.node_config, run)
    return get_agent(load_policy(node.policy), seed=run.seed if run.seed >= 0 else None)


def _error(msg: Message, exc: Exception) -> Message:
    log.error("site error: %s", exc)
    return Message(Error(code=ERROR_CODE, reason=str(exc)), reply_to=msg)


def handle_train(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    """Train one round at this site, or refuse with the reason."""
    try:
        agent = _agent(context, overrides)
        req = TrainRequest.from_record(msg.content.config_records["config"])
        out = agent.train_round(msg.content.array_records["arrays"], req)
    except FedtuneError as exc:
        return _error(msg, exc)
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": out.num_examples, "site-weight": 1.0, **out.metrics}),
            "site": ConfigRecord(
                {"name": out.site, "status": "trained" if out.trained else "refused", "reason": out.reason}
            ),
            "scrub": ConfigRecord(dict(out.scrub_counts)),
        }
    )
    if out.receipt:
        content["receipt"] = ConfigRecord(dict(out.receipt))
    if out.arrays is not None:
        content["arrays"] = out.arrays
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    """Held-out loss of the global adapter at this site."""
    try:
        agent = _agent(context, overrides)
        req = TrainRequest.from_record(msg.content.config_records["config"])
        arrays = msg.content.array_records["arrays"]
        loss, n = agent.evaluate(arrays, req)
    except FedtuneError as exc:
        return _error(msg, exc)
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord({"eval-loss": loss, "num-examples": n, "site-weight": 1.0}),
                "site": ConfigRecord({"name": agent.policy.name}),
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
