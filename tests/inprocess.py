"""An in-process Flower ``Grid``: the real ServerApp logic against the real ClientApp handlers.

No SuperLink, no Ray: ``send_and_receive`` calls ``client.client_app.handle_train`` /
``handle_evaluate`` for each node in turn, so coordinator logic (triage, dropouts,
checkpoints, resume) is tested with plain function calls in seconds. An exception in a
handler becomes an error reply, as Flower's ClientApp runtime does.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import handle_evaluate, handle_train
from common.config import default_run_config
from fedtune.simulate import prepare_run


def federation(
    out: Path, model: Path, data: Path, sites: int, **run_config: Any
) -> tuple[dict[str, Any], list[str]]:
    """Lay out ``out`` as ``fedtune simulate`` does; return the run config and the site names."""
    seeded = int(run_config.get("seed", -1)) >= 0
    policies = prepare_run(
        out, sites=sites, model=model, data=data, max_epsilon=8.0, delta=1e-5, seeded=seeded
    )
    cfg = default_run_config() | {
        "model-dir": str(model),
        "out-dir": str(out),
        "federation-dir": str(out),
        "site-keys": str(out / "keys"),
        "sim-policies": json.dumps([str(p) for p in policies]),
        **run_config,
    }
    return cfg, [p.parent.name for p in policies]


class QueueGrid(Grid):
    """A grid without a SuperLink: a pushed message is answered when its reply is pulled.

    Subclasses say how a node answers (:meth:`_deliver`); nodes in ``down`` never answer (they time out).
    """

    def __init__(self, nodes: Iterable[int], down: Iterable[int] = ()) -> None:
        self.node_ids = list(nodes)
        self.down = set(down)
        self.queued: dict[str, Message] = {}  # pushed, not yet pulled
        self._next_id = itertools.count()  # message ids are never reused, whatever was pulled

    def set_run(self, run: Any) -> None:
        """Unused: one run per grid."""

    @property
    def run(self) -> Any:
        """Unused."""
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Unused by the Message-API strategies."""
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        """All nodes, including those that will not answer."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue each message; its node answers when the reply is pulled."""
        ids = []
        for msg in messages:
            self.queued[mid := f"m{next(self._next_id)}"] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to the queued messages ``message_ids`` (a node that is down never answers)."""
        replies = []
        for mid in message_ids:
            msg = self.queued.get(mid)
            if msg is not None and msg.metadata.dst_node_id not in self.down:
                del self.queued[mid]
                replies.append(self._deliver(msg))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message to its node and collect the replies."""
        return [self._deliver(m) for m in messages if m.metadata.dst_node_id not in self.down]

    def _deliver(self, msg: Message) -> Message:
        """The node's answer to ``msg``."""
        raise NotImplementedError


class InProcessGrid(QueueGrid):
    """``n`` simulated nodes (partition ids 0..n-1) answering through the real ClientApp handlers."""

    def __init__(self, n: int, run_config: Mapping[str, Any], down: Iterable[int] = ()) -> None:
        self.run_config = dict(run_config)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as the ServerApp's
        self.nodes = {1000 + i: i for i in range(n)}
        super().__init__(self.nodes, down)
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config={"partition-id": pid}, state=RecordDict(), run_config={}
            )
            for node, pid in self.nodes.items()
        }

    def _deliver(self, msg: Message) -> Message:
        """The node's answer to ``msg``; a crash becomes an error reply, as in Flower's ClientApp runtime."""
        handler = handle_train if msg.metadata.message_type.startswith("train") else handle_evaluate
        try:
            return handler(msg, self.contexts[msg.metadata.dst_node_id], self.run_config)
        except Exception as exc:
            return Message(Error(code=3, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
