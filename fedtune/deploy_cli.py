"""``fedtune deploy``: provision a federation for Flower's Deployment Engine.

``provision`` writes, under ``--out``::

    ca/ca.key                       the CA's private key: keep it offline (re-issuing only)
    operator/                       for the central operator (SuperLink host)
        ca.pem                      the federation's CA certificate
        superlink.pem superlink.key the SuperLink's TLS certificate (SANs: hosts + loopback) and key
        site-keys/<site>.pub        each site's node-authentication public key (to register)
        ledger-keys/<site>.pub.pem  each site's ledger-verification key (for auditors)
        flwr-home/config.toml       Flower configuration: the federation's address and CA
        sites.txt                   the site names, one a line
    sites/<site>/                   one folder to hand over to each site
        ca.pem                      to verify the SuperLink
        node-auth.key node-auth.pub the SuperNode's authentication key pair (OpenSSH, ECDSA P-384)
        keys/ledger-signing-key.pem the site's Ed25519 ledger signing key (+ .pub.pem)
        policy.toml                 the site policy template (data, model, privacy budget)
        site.env                    SUPERLINK=host:port, read by deploy/start-supernode.sh
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from client.policy import render_policy
from common.errors import ConfigError
from fedtune.provision import (
    DEFAULT_PORT,
    ca_certificate,
    certificate_pem,
    flower_config_toml,
    node_key_pair,
    parse_hosts,
    parse_sites,
    private_key_pem,
    server_certificate,
    write_file,
)
from privacy.keys import generate_keypair

deploy_app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()
FEDERATION = "fedtune"


@deploy_app.callback()
def _group() -> None:
    """Provision and run a federation on Flower's Deployment Engine (TLS + node authentication)."""


@dataclass(frozen=True)
class Provisioned:
    """Where ``provision_federation`` wrote things."""

    root: Path
    operator: Path
    sites: dict[str, Path]
    address: str


def _site_paths(name: str, data_dir: Path | None, model: Path | None) -> tuple[Path, Path, list[str]]:
    """The data and model paths a policy template starts with, and notes for the operator."""
    notes = []
    if data_dir is not None:
        data = data_dir.resolve() / f"{name}.jsonl"
        if not data.is_file():
            notes.append(f"{name}: {data} does not exist yet (edit [data] path in its policy.toml)")
    else:
        data = Path("data") / f"{name}.jsonl"  # relative to the policy file
    return data, (model.resolve() if model is not None else Path("model")), notes


def provision_federation(
    out: Path,
    *,
    sites: list[str],
    hosts: list[str],
    port: int = DEFAULT_PORT,
    data_dir: Path | None = None,
    model: Path | None = None,
    max_epsilon: float = 8.0,
    delta: float = 1e-5,
) -> tuple[Provisioned, list[str]]:
    """Create the CA, the SuperLink certificate and every site's folder under ``out``.

    Parameters
    ----------
    out
        A new or empty folder.
    sites
        Site names (folder names, SuperNode names, policy ``[site] name``).
    hosts
        Subject alternative names of the SuperLink certificate; the first is the address sites dial.
    port
        The SuperLink's port (Fleet, Control and Runtime APIs share it).
    data_dir, model
        Optional: ``<data_dir>/<site>.jsonl`` and the base model folder written into each policy;
        otherwise the templates point at ``data/<site>.jsonl`` and ``model/`` beside the policy.
    max_epsilon, delta
        Each site's starting privacy budget (the site's privacy office owns and may lower it).

    Returns
    -------
    (Provisioned, list[str])
        The layout, and notes for the operator (e.g. data files not found).
    """
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(str(out), ["the folder is not empty: provisioning never overwrites keys"])
    operator = out / "operator"
    address = f"{hosts[0]}:{port}"
    ca_key, ca_cert = ca_certificate()
    write_file(out / "ca" / "ca.key", private_key_pem(ca_key), secret=True)
    ca_pem = certificate_pem(ca_cert)
    write_file(operator / "ca.pem", ca_pem)
    tls_key, tls_cert = server_certificate(ca_key, ca_cert, hosts)
    write_file(operator / "superlink.pem", certificate_pem(tls_cert))
    write_file(operator / "superlink.key", private_key_pem(tls_key), secret=True)
    write_file(
        operator / "flwr-home" / "config.toml",
        flower_config_toml(FEDERATION, address, operator / "ca.pem").encode(),
    )
    write_file(operator / "sites.txt", "".join(f"{s}\n" for s in sites).encode())
    notes: list[str] = []
    site_dirs = {}
    for name in sites:
        site = out / "sites" / name
        write_file(site / "ca.pem", ca_pem)
        pair = node_key_pair(f"fedtune-{name}")
        write_file(site / "node-auth.key", pair.private_openssh, secret=True)
        write_file(site / "node-auth.pub", pair.public_openssh)
        write_file(operator / "site-keys" / f"{name}.pub", pair.public_openssh)
        _, public = generate_keypair(site / "keys")
        (operator / "ledger-keys").mkdir(exist_ok=True)
        shutil.copyfile(public, operator / "ledger-keys" / f"{name}.pub.pem")
        data, model_path, site_notes = _site_paths(name, data_dir, model)
        notes += site_notes
        policy = render_policy(
            name=name,
            data_path=data,
            model_path=model_path,
            max_epsilon=max_epsilon,
            delta=delta,
            signing_key=Path("keys") / "ledger-signing-key.pem",  # relative to the policy file
            ledger_head=Path("anchor") / "ledger-head.json",  # outside state/: a lost state folder shows
        )
        (site / "anchor").mkdir(exist_ok=True)
        write_file(site / "policy.toml", policy.encode())
        write_file(site / "site.env", f"SUPERLINK={address}\n".encode())
        site_dirs[name] = site
    return Provisioned(out, operator, site_dirs, address), notes


@deploy_app.command("provision")
def provision(
    sites: Annotated[str, typer.Option(help="Comma-separated site names, e.g. hospital-a,hospital-b.")],
    superlink_host: Annotated[
        str, typer.Option(help="Host name(s)/IP(s) sites dial, comma-separated; the first is used.")
    ],
    out: Annotated[Path, typer.Option(help="New folder for the CA, the operator and the sites.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="SuperLink port.")] = DEFAULT_PORT,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder holding <site>.jsonl (written into each policy).")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Base model folder (written into each policy).")] = None,
    max_epsilon: Annotated[float, typer.Option(help="Each site's starting privacy budget.")] = 8.0,
    delta: Annotated[float, typer.Option(help="Each site's delta.")] = 1e-5,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and one hand-over folder per site."""
    names = parse_sites(sites)
    hosts = parse_hosts(superlink_host)
    done, notes = provision_federation(
        out,
        sites=names,
        hosts=hosts,
        port=port,
        data_dir=data_dir,
        model=model,
        max_epsilon=max_epsilon,
        delta=delta,
    )
    console.print(f"federation [bold]{FEDERATION}[/bold] at {done.address} (TLS SANs: {', '.join(hosts)})")
    console.print(f"operator folder: [bold]{done.operator}[/bold] (keep {done.root / 'ca'} offline)")
    for name, path in done.sites.items():
        console.print(f"site folder for {name}: {path}")
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    console.print("next: deploy/start-superlink.sh, deploy/register-sites.sh (see deploy/README.md)")
    console.print(
        "each site, before its SuperNode: fedtune site prepare --policy SITE_DIR/policy.toml "
        "(validates and scrubs its records once; rounds refuse until it has)"
    )
