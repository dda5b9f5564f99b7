"""End-to-end on Flower's Deployment Engine over loopback: TLS, node authentication, the real app.

One harness: provision with ``fedtune deploy``, start a SuperLink (TLS + SuperNode auth) and two
SuperNodes with the ``deploy/*.sh`` wrappers, run 2 rounds with ``deploy/run.sh`` (``flwr run``),
check the summary, the site ledgers and ``flwr ls``; in the same federation an unregistered
SuperNode and connections without TLS are refused. Every process is stopped by PID at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from client.policy import load_policy
from client.prepare import prepare_site
from fedtune.deploy_cli import provision_federation

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ppid_map() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Procs:
    """Processes started by the test, their logs, and a stop-everything-by-PID."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: list[subprocess.Popen[bytes]] = []
        self.seen: set[int] = set()
        self._files: list[IO[bytes]] = []

    def start(self, name: str, *cmd: str | Path) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        p = subprocess.Popen(
            [str(c) for c in cmd], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.track()
            if text in self.log(name):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(f"{name}: no '{text}' within {timeout}s:\n{self.log(name)[-3000:]}")

    def track(self) -> None:
        """Remember every descendant (Flower's SuperExec starts its own session)."""
        parents = _ppid_map()
        roots = {p.pid for p in self.started} | self.seen
        changed = True
        while changed:
            new = {pid for pid, ppid in parents.items() if ppid in roots and pid not in roots}
            roots |= new
            changed = bool(new)
        self.seen = roots

    def stop_all(self) -> list[int]:
        """SIGTERM every process group, then SIGKILL what is left; return PIDs still alive."""
        self.track()
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in sorted(self.seen):
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        pgid = os.getpgid(pid)
                        if pgid == os.getpgrp():  # never signal the test runner's own group
                            os.kill(pid, sig)
                        else:
                            os.killpg(pgid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in self.seen):
                for p in self.started:
                    p.poll()
                time.sleep(0.2)
        for p in self.started:
            p.poll()
        for f in self._files:
            f.close()
        return [pid for pid in self.seen if _alive(pid)]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("FLWR_HOME", None)  # the wrappers default it into the operator's / site's folder
    (tmp_path / "logs").mkdir()
    p = Procs(tmp_path / "logs", env)
    try:
        yield p
    finally:
        left = p.stop_all()
    assert not left, f"processes still running after stop: {left}"


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("the refused SuperNode is still running") from None


def test_tls_node_auth_federation(procs: Procs, tmp_path: Path, tiny_model: Path, site_data: Path) -> None:
    t0 = time.monotonic()
    names = sorted(p.stem for p in site_data.glob("*.jsonl"))[:3]
    sites, rogue = names[:2], names[2]
    port = _free_port()
    fed, _ = provision_federation(
        tmp_path / "fed",
        sites=names,
        hosts=["127.0.0.1", "localhost"],
        port=port,
        data_dir=site_data,
        model=tiny_model,
        max_epsilon=8.0,
    )
    op = fed.operator

    def run(name: str, *cmd: str | Path, timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**procs.env, "FLWR_HOME": str(op / "flwr-home")}
        r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
        (procs.logs / f"{name}.log").write_text(r.stdout + r.stderr)
        return r

    link = procs.start("superlink", DEPLOY / "start-superlink.sh", op, "--host", "127.0.0.1")
    procs.wait_for("superlink", "Uvicorn running on https://", link)
    reg = run("register", DEPLOY / "register-sites.sh", op, *sites, timeout=60)
    assert reg.returncode == 0 and reg.stdout.count("registered successfully") == 2, reg.stdout + reg.stderr

    for name in sites:  # each site's admin prepares its records before starting its SuperNode
        prepare_site(load_policy(fed.sites[name] / "policy.toml"))
    nodes = []
    for name in sites:
        node = procs.start(name, DEPLOY / "start-supernode.sh", fed.sites[name], "--port", str(_free_port()))
        nodes.append((name, node))
    for name, node in nodes:
        procs.wait_for(name, "SuperNode ID:", node)
    t_up = time.monotonic()

    # an unregistered key is refused by the SuperLink
    bad = procs.start(
        "rogue",
        DEPLOY / "start-supernode.sh",
        fed.sites[rogue],
        "--port",
        str(_free_port()),
        "--max-retries",
        "1",
    )
    _wait_exit(bad, 60)
    assert "Failed to activate SuperNode" in procs.log("rogue")
    assert "SuperNode ID:" not in procs.log("rogue")

    # no TLS: the wrapper's explicit --insecure warns, and the TLS-only SuperLink refuses the connection
    plain = procs.start(
        "insecure",
        DEPLOY / "start-supernode.sh",
        fed.sites[rogue],
        "--insecure",
        "--port",
        str(_free_port()),
        "--max-retries",
        "1",
    )
    _wait_exit(plain, 60)
    text = procs.log("insecure")
    assert "WARNING: --insecure" in text
    assert "could not establish a connection" in text and "SuperNode ID:" not in text
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # plaintext HTTP to the TLS port
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/")
        conn.getresponse()
    conn.close()
    insecure_home = tmp_path / "insecure-home"
    insecure_home.mkdir()
    (insecure_home / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n[superlink.x]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    ls_plain = subprocess.run(
        ["flwr", "ls"], env={**procs.env, "FLWR_HOME": str(insecure_home)}, capture_output=True, timeout=60
    )
    assert ls_plain.returncode != 0

    # 2 rounds of the real app through `flwr run`
    out = tmp_path / "run"
    cfg = (
        f"num-server-rounds=2 local-steps=3 batch-size=8 max-seq-len=128 "
        f"model-dir='{tiny_model}' out-dir='{out}'"
    )
    t_run = time.monotonic()
    r = run("flwr-run", DEPLOY / "run.sh", op, "--", "--run-config", cfg, timeout=420)
    t_done = time.monotonic()
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and sorted(summary["sites"]) == sites
    for name, s in summary["sites"].items():
        assert s["rounds_trained"] == 2, (name, s)
        assert 0 < s["epsilon"] <= s["max_epsilon"] == 8.0
        ledger = fed.sites[name] / "state" / "ledger.jsonl"
        kinds = [json.loads(x)["kind"] for x in ledger.read_text().splitlines()]
        assert kinds == ["reserve", "commit", "reserve", "commit"], (name, kinds)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (fed.sites[rogue] / "state").exists()  # the refused site never trained

    # operator view: Flower's own `flwr ls` shows the finished run and the connected sites
    ls = run("flwr-ls", "flwr", "ls", "--format", "json", timeout=60)
    runs = json.loads(ls.stdout[ls.stdout.index("{") :])["runs"]
    assert [x["status"] for x in runs] == ["finished:completed"]
    sn = run("flwr-supernode-ls", "flwr", "supernode", "ls", "--format", "json", timeout=60)
    assert len(json.loads(sn.stdout[sn.stdout.index("{") :])["nodes"]) == 2
    print(
        f"\ntiming: federation up {t_up - t0:.1f}s, refusal checks {t_run - t_up:.1f}s, "
        f"2 rounds via flwr run {t_done - t_run:.1f}s, total {time.monotonic() - t0:.1f}s"
    )
