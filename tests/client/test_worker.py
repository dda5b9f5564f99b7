"""The site worker: one warm process answers every round; the channel carries data, never code."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client.client_app import handle_evaluate
from client.worker import WorkerClient, decode_frame, encode_frame, key_path, share_with_group
from common.errors import ConfigError
from tests.client.hostile import Site, reason, serving, status


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, hostile_data: Path, tiny_model: Path) -> Iterator[Site]:
    """A site whose rounds go to `fedtune site serve` (a real process, stopped by PID at the end)."""
    site = Site(tmp_path_factory.mktemp("worker") / "site", hostile_data, tiny_model)
    sock = site.root / "w.sock"
    cli = Path(sys.executable).parent / "fedtune"
    with serving(site, [str(cli), "site", "serve", str(site.policy), "--socket", str(sock)], sock,
                 site.root / "worker.log"):  # fmt: skip
        yield site
    assert not sock.exists() or not key_path(sock).exists()  # the key goes with the worker


def _evaluate(site: Site, arrays: ArrayRecord) -> Message:
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(site.request_record(3))}),
        dst_node_id=1,
        message_type="evaluate",
    )
    ctx = Context(run_id=1, node_id=1, node_config=dict(site.node_config), state=RecordDict(), run_config={})
    return handle_evaluate(msg, ctx, {})


def test_rounds_run_in_one_warm_process(worker: Site, start_adapter: ArrayRecord) -> None:
    sock = worker.node_config["worker"]
    assert status(worker.ask(start_adapter, 1)) == "trained"
    first = WorkerClient(sock).stats()
    reply = worker.ask(start_adapter, 2)
    assert status(reply) == "trained" and set(reply.content.array_records["arrays"]) == set(start_adapter)
    ev = _evaluate(worker, start_adapter)
    assert not ev.has_error() and np.isfinite(ev.content.metric_records["metrics"]["eval-loss"])
    assert ev.content.config_records["site"]["name"] == "s1"
    after = WorkerClient(sock).stats()
    assert after["pid"] == first["pid"] != os.getpid()
    # after the first round nothing is loaded, hashed or tokenized again, and the one adapter of the
    # three requests is scored on the held-out records once
    loads = {"data": 1, "weight-hash": 1, "model": 1, "tokenize": 1, "held-out": 1}
    assert after["loads"] == first["loads"] == loads
    assert worker.kinds()[-4:] == ["reserve", "commit", "reserve", "commit"]


def test_a_refusal_and_its_ledger_entry_come_through_unchanged(
    worker: Site, start_adapter: ArrayRecord
) -> None:
    reply = worker.ask_record(start_adapter, worker.request_record(3) | {"learning-rate": 5.0})
    assert status(reply) == "refused" and "above the site's max-learning-rate" in reason(reply)
    assert worker.kinds()[-1] == "refuse"
    reply = worker.ask_record(
        start_adapter, worker.request_record(3) | {"run-id": b"raw-bytes"}
    )  # bytes survive the channel as bytes
    assert status(reply) == "refused" and "'run-id'" in reason(reply)


def test_garbage_and_wrong_keys_do_not_stop_the_worker(
    worker: Site, start_adapter: ArrayRecord, tmp_path: Path
) -> None:
    sock = Path(worker.node_config["worker"])
    with Client(str(sock), family="AF_UNIX", authkey=key_path(sock).read_bytes()) as conn:
        conn.send_bytes(b"\x00\x00\x00\x00\x00\x00\x00\x05{not json")
        header, _ = decode_frame(conn.recv_bytes())
    assert (
        header == {"ok": False, "kind": "fedtune", "error": header["error"]}
        and "malformed" in header["error"]
    )
    with pytest.raises(AuthenticationError):  # the HMAC challenge fails on a wrong key
        Client(str(sock), family="AF_UNIX", authkey=b"x" * 32)
    assert WorkerClient(sock).stats()["pid"] > 0  # still serving
    with pytest.raises(ConfigError, match="no site worker is running: start it with `fedtune site serve"):
        WorkerClient(tmp_path / "none.sock").stats()


def test_the_socket_and_key_can_be_shared_with_the_supernodes_group(tmp_path: Path) -> None:
    import grp

    sock = tmp_path / "w.sock"
    sock.write_bytes(b"")
    key_path(sock).write_bytes(b"k")
    for p in (sock, key_path(sock)):
        p.chmod(0o600)
    group = grp.getgrgid(os.getgid()).gr_name
    share_with_group(sock, group)
    assert (sock.stat().st_mode & 0o777, key_path(sock).stat().st_mode & 0o777) == (0o660, 0o640)
    assert sock.stat().st_gid == os.getgid()
    with pytest.raises(ConfigError, match="no group named 'no-such-group-x'"):
        share_with_group(sock, "no-such-group-x")


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(
    header=st.dictionaries(st.text(min_size=1).filter(lambda k: k != "arrays"), _VALUES, max_size=4),
    blobs=st.dictionaries(st.text(min_size=1), st.binary(max_size=64), max_size=3),
)
def test_a_frame_round_trips_exactly(header: dict[str, object], blobs: dict[str, bytes]) -> None:
    arrays = (
        ArrayRecord({k: Array("float32", (len(v),), "numpy.ndarray", v) for k, v in blobs.items()})
        if blobs
        else None
    )
    got, back = decode_frame(encode_frame(header, arrays))
    assert got == header
    assert (back is None) == (arrays is None)
    if arrays is not None and back is not None:
        assert {k: (a.dtype, tuple(a.shape), a.data) for k, a in back.items()} == {
            k: (a.dtype, tuple(a.shape), a.data) for k, a in arrays.items()
        }


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_value_error(frame: bytes) -> None:
    with contextlib.suppress(ValueError):  # anything else escaping is the failure
        decode_frame(frame)
