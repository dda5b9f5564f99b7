"""A site behind its real ClientApp handler, for tests that play a hostile coordinator."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import handle_train
from client.policy import render_policy
from common.config import RunConfig, TrainRequest
from common.modeling import model_fingerprint


class Site:
    """One site behind its ClientApp handler, as a SuperNode runs it."""

    def __init__(self, root: Path, data: Path, model: Path, **policy: Any) -> None:
        self.root, self.data, self.model = root, data, model
        self.policy = root / "policy.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.write_policy(**policy)
        self.fingerprint = model_fingerprint(model)
        self.node_config: dict[str, Any] = {"policy": str(self.policy)}  # or {"worker": SOCKET}

    def write_policy(self, **kw: Any) -> None:
        self.policy.write_text(render_policy(name="s1", data_path=self.data, model_path=self.model, **kw))

    @property
    def ledger(self) -> Path:
        return self.root / "state" / "ledger.jsonl"

    def entries(self, ledger: Path | None = None) -> list[dict[str, Any]]:
        path = ledger or self.ledger
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.entries()]

    def request_record(self, rnd: int = 1, *, run: str = "run1") -> dict[str, Any]:
        """A well-formed request of round ``rnd`` of run ``run``, as a coordinator sends it."""
        cfg = RunConfig.from_flower(
            {
                "local-steps": 2,
                "batch-size": 6,
                "max-seq-len": 64,
                "lora-rank": 4,
                "lora-alpha": 8,
                "num-server-rounds": 3,
            }
        )
        return TrainRequest.build(cfg, server_round=rnd, run_id=run, fingerprint=self.fingerprint).to_record()

    def ask_record(self, arrays: ArrayRecord, record: dict[str, Any]) -> Message:
        """The site's reply to a train message carrying ``record`` and ``arrays``."""
        msg = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord(record)}),
            dst_node_id=1,
            message_type="train",
        )
        context = Context(
            run_id=1, node_id=1, node_config=dict(self.node_config), state=RecordDict(), run_config={}
        )
        return handle_train(msg, context, {})

    def ask(self, arrays: ArrayRecord, rnd: int = 1, *, run: str = "run1", **request: Any) -> Message:
        """The site's reply to round ``rnd`` of ``run``, with ``request`` changed."""
        return self.ask_record(arrays, self.request_record(rnd, run=run) | request)


def status(reply: Message) -> str:
    """'trained', 'refused' or 'error'."""
    return "error" if reply.has_error() else str(reply.content.config_records["site"]["status"])


def reason(reply: Message) -> str:
    """The site's reason: a refusal's, or an error reply's."""
    if reply.has_error():
        return str(reply.error.reason)
    return str(reply.content.config_records["site"]["reason"])


@contextlib.contextmanager
def serving(site: Site, cmd: Sequence[str], sock: Path, log_path: Path, **env: str) -> Iterator[None]:
    """Prepare the site, run its worker ``cmd`` until the block ends (stopped by PID); rounds go to it."""
    from client.policy import load_policy
    from client.prepare import prepare_site

    prepare_site(load_policy(site.policy))  # as `fedtune site prepare` before `fedtune site serve`
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=os.environ | env)
        try:
            deadline = time.monotonic() + 240
            while b"site worker ready" not in log_path.read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            site.node_config = {"worker": str(sock)}
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=60)
