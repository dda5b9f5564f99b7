"""The site worker: one long-lived process per site that keeps the model, data and ledger warm.

Flower's Deployment Engine starts a fresh ClientApp process for every message, so in-process each
round re-imports torch, Opacus and Presidio, re-hashes the base weights, reloads the model and
re-tokenizes the data. ``fedtune site serve POLICY`` starts this worker instead: it loads everything
once (:meth:`client.site.SiteAgent.setup`) and answers each round handed over by the SuperNode's
ClientApp (node config ``worker = "<socket>"``), which then only forwards messages and imports
nothing heavy. The worker also owns the GPU, the data and the ledger; run it as the user that owns
them and the SuperNode as another user in the worker's ``--group``, and the code the coordinator ships
can reach the socket but never open the site's records.

The channel is the standard library's ``multiprocessing.connection`` over a Unix socket, with its
HMAC challenge on a 32-byte key the worker writes beside the socket (mode 0600). Only bytes cross it
-- never pickles, since the ClientApp is the coordinator's code -- in frames of a JSON header (the
request's values, ``bytes`` tagged) and the arrays' raw Flower ``Array`` fields, so the worker sees
exactly what the ClientApp received and applies the same checks as the in-process agent.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import struct
import time
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord

from client.outcome import RoundOutcome
from common.errors import ConfigError, FedtuneError

if TYPE_CHECKING:
    from client.distributed import LeaderStep

__all__ = ["WorkerClient", "decode_frame", "encode_frame", "key_path", "serve", "share_with_group"]

log = logging.getLogger(__name__)
MAX_FRAME = 2**34  # 16 GiB: far above any adapter; a longer frame is refused unread
_HEADER = struct.Struct(">Q")
_OUTCOME_FIELDS = (
    "site",
    "trained",
    "reason",
    "num_examples",
    "metrics",
    "scrub_counts",
    "receipt",
    "public_key",
    "train_kind",
)


def key_path(socket: str | Path) -> Path:
    """The worker's authentication key, beside its socket."""
    return Path(f"{socket}.key")


def _tag(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag(v) for k, v in value.items()}
    return value


def _untag(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        return {k: _untag(v) for k, v in value.items()}
    return value


def encode_frame(header: Mapping[str, Any], arrays: ArrayRecord | None = None) -> bytes:
    """One frame: the header (JSON; ``bytes`` values tagged) and the arrays' raw fields."""
    items = list((arrays or {}).items())
    meta = [
        {"key": k, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype, "size": len(a.data)}
        for k, a in items
    ]
    head = json.dumps({**{k: _tag(v) for k, v in header.items()}, "arrays": meta}).encode()
    return b"".join([_HEADER.pack(len(head)), head, *(a.data for _, a in items)])


def decode_frame(frame: bytes) -> tuple[dict[str, Any], ArrayRecord | None]:
    """The header and arrays of a frame; ``ValueError`` naming what is malformed."""
    if len(frame) < _HEADER.size:
        raise ValueError("a frame shorter than its length field")
    (size,) = _HEADER.unpack_from(frame)
    end = _HEADER.size + size
    if end > len(frame):
        raise ValueError("the header runs past the end of the frame")
    try:
        header = json.loads(frame[_HEADER.size : end])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise ValueError("the header is not a JSON object with an 'arrays' list")
    out: dict[str, Array] = {}
    for m in header.pop("arrays", []):
        try:
            key, n = str(m["key"]), int(m["size"])
            shape = tuple(int(d) for d in m["shape"])
            array = Array(
                dtype=str(m["dtype"]), shape=shape, stype=str(m["stype"]), data=frame[end : end + n]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"an array entry is malformed ({exc!r})") from None
        if n < 0 or end + n > len(frame) or key in out:
            raise ValueError(f"array '{key}' is duplicated or runs past the end of the frame")
        out[key], end = array, end + n
    if end != len(frame):
        raise ValueError(f"{len(frame) - end} bytes after the last array")
    return {k: _untag(v) for k, v in header.items()}, (ArrayRecord(out) if out else None)


def _outcome_frame(out: RoundOutcome) -> bytes:
    return encode_frame({"ok": True, "outcome": {f: getattr(out, f) for f in _OUTCOME_FIELDS}}, out.arrays)


def handle(policy_path: Path, frame: bytes, leader: LeaderStep | None = None) -> bytes:
    """Answer one frame with the site agent of ``policy_path`` (reloaded only if the policy changed).

    ``leader``: this worker is rank 0 of several; its rounds train across every rank.
    """
    from client.policy import load_policy
    from client.site import get_agent

    try:
        header, arrays = decode_frame(frame)
        agent = get_agent(load_policy(policy_path))
        if leader is not None:
            leader.attach(agent)
        op, request = header.get("op"), header.get("request", {})
        if op == "stats":
            return encode_frame({"ok": True, "pid": os.getpid(), "loads": dict(agent.loads)})
        if not isinstance(request, dict) or arrays is None or op not in ("train", "evaluate"):
            raise ValueError("expected op 'train' or 'evaluate' with a request object and arrays")
        if op == "train":
            return _outcome_frame(agent.train_round(arrays, request))
        metrics, n = agent.evaluate(arrays, request)
        return encode_frame({"ok": True, "metrics": metrics, "num-examples": n, "site": agent.policy.name})
    except FedtuneError as exc:
        return encode_frame({"ok": False, "kind": "fedtune", "error": str(exc)})
    except ValueError as exc:
        return encode_frame({"ok": False, "kind": "fedtune", "error": f"malformed worker frame: {exc}"})
    except Exception as exc:  # a crash of this round: reported like an in-process crash, the worker lives on
        log.exception("site worker: the round crashed")
        return encode_frame({"ok": False, "kind": "crash", "error": f"{type(exc).__name__}: {exc}"})


def share_with_group(socket: Path, group: str) -> None:
    """Let ``group`` (the SuperNode's user) reach the worker: socket 0660, key 0640, both in ``group``."""
    import grp

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            "--group", [f"no group named {group!r} on this machine: create it or name another"]
        ) from None
    for path, mode in ((socket, 0o660), (key_path(socket), 0o640)):
        os.chown(path, -1, gid)
        os.chmod(path, mode)


def serve(policy_path: str | Path, socket: str | Path | None = None, *, group: str = "") -> None:
    """Load the site once, then answer the SuperNode's rounds on ``socket`` until SIGTERM / SIGINT.

    ``group``: run the worker as the user that owns the data, state and keys, and the SuperNode as
    another user in ``group``; the coordinator's ClientApp then reaches the socket but not the records.
    Without it both must run as one user (socket and key 0600).

    Under ``torchrun --nproc-per-node N`` this is rank 0 and the other ranks train with it
    (:mod:`client.distributed`); they never read the data, the key or the ledger.
    """
    from client.compute import resolve
    from client.distributed import LeaderStep, Ranks, follow, init_group
    from client.policy import load_policy
    from client.site import get_agent

    policy_file = Path(policy_path).expanduser().resolve()
    policy = load_policy(policy_file)
    ranks = Ranks.from_env()
    leader: LeaderStep | None = None
    if ranks is not None:
        where = f"{policy.source} [compute]"
        init_group(ranks, cuda=resolve(policy.compute, where=where, local_rank=ranks.local_rank).is_cuda)
        if not ranks.leader:
            follow(policy_file, ranks)
            return
        leader = LeaderStep()
    agent = get_agent(policy)
    if leader is not None:
        leader.attach(agent)
    agent.setup()  # imports, scrubbed data, the weight hash, the tokenizer: once
    sock = Path(socket).expanduser().resolve() if socket else policy.state_dir / "worker.sock"
    if len(os.fsencode(sock)) > 100:  # AF_UNIX addresses are at most 107 bytes
        raise ConfigError(
            str(sock), ["a Unix socket path must be under 100 bytes: choose a shorter --socket"]
        )
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.exists():
        if _alive(sock):
            raise ConfigError(str(sock), ["a site worker is already listening here: stop it first"])
        sock.unlink()
    key = secrets.token_bytes(32)
    kp = key_path(sock)
    tmp = kp.with_name(kp.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    os.replace(tmp, kp)
    signal.signal(signal.SIGTERM, _exit)
    old = os.umask(0o177)  # the socket is created 0600
    try:
        listener = Listener(str(sock), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old)
    if group:
        share_with_group(sock, group)
    log.info("site %s worker ready on %s (pid %d)", policy.name, sock, os.getpid())
    print(f"site worker ready: {sock}", flush=True)
    try:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as exc:
                log.warning("site worker: refused a connection (%s)", exc)
                continue
            with conn:
                try:
                    frame = conn.recv_bytes(MAX_FRAME)
                    start = time.perf_counter()
                    answer = handle(policy_file, frame, leader)
                    log.info("site worker: answered in %.2f s", time.perf_counter() - start)
                    conn.send_bytes(answer)
                except (OSError, EOFError) as exc:
                    log.warning("site worker: the ClientApp went away (%s)", exc)
    finally:
        listener.close()
        kp.unlink(missing_ok=True)
        if leader is not None:
            leader.stop()


def _exit(*_: object) -> None:
    raise SystemExit(0)  # SIGTERM: leave through the finally blocks (socket closed, key removed)


def _alive(sock: Path) -> bool:
    key = key_path(sock)
    try:
        Client(str(sock), family="AF_UNIX", authkey=key.read_bytes()).close()
    except (OSError, AuthenticationError, EOFError):
        return False
    return True


class WorkerClient:
    """The ClientApp's side: hand a round to the site worker at ``socket`` and return its answer."""

    def __init__(self, socket: str | Path) -> None:
        self.socket = Path(socket)

    def _call(
        self, header: Mapping[str, Any], arrays: ArrayRecord | None
    ) -> tuple[dict[str, Any], ArrayRecord | None]:
        fix = f"start it with `fedtune site serve POLICY --socket {self.socket}`"
        try:
            key = key_path(self.socket).read_bytes()
            conn = Client(str(self.socket), family="AF_UNIX", authkey=key)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ConfigError(
                "node config", [f"worker = '{self.socket}': no site worker is running: {fix}"]
            ) from None
        except AuthenticationError:
            raise ConfigError(
                "node config",
                [f"worker = '{self.socket}': the key beside the socket is not the worker's: restart it"],
            ) from None
        with conn:
            conn.send_bytes(encode_frame(header, arrays))
            reply, out = decode_frame(conn.recv_bytes(MAX_FRAME))
        if not reply.get("ok"):
            error = str(reply.get("error", "the site worker failed"))
            raise (
                FedtuneError(error)
                if reply.get("kind") == "fedtune"
                else RuntimeError(f"site worker: {error}")
            )
        return reply, out

    def train(self, arrays: ArrayRecord, request: Mapping[str, Any]) -> RoundOutcome:
        """One training round at the worker (a refusal is an outcome, a site error a ``FedtuneError``)."""
        reply, out = self._call({"op": "train", "request": dict(request)}, arrays)
        return RoundOutcome(**reply["outcome"], arrays=out)

    def evaluate(self, arrays: ArrayRecord, request: Mapping[str, Any]) -> tuple[dict[str, float], int, str]:
        """Held-out metrics (``eval-loss``, for dpo the reward margin and accuracy), record count, site."""
        reply, _ = self._call({"op": "evaluate", "request": dict(request)}, arrays)
        metrics = reply.get("metrics")
        if not isinstance(metrics, dict) or "eval-loss" not in metrics:
            raise ValueError("the site worker's evaluate answer has no metrics")
        return {str(k): float(v) for k, v in metrics.items()}, int(reply["num-examples"]), str(reply["site"])

    def stats(self) -> dict[str, Any]:
        """The worker's pid and what it has loaded so far (``loads``: model, data, weight-hash...)."""
        return self._call({"op": "stats"}, None)[0]
