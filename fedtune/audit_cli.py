"""``fedtune audit ...`` (for compliance officers) and ``fedtune site keygen`` (for sites).

Exit codes of ``audit verify``: 0 every check held, 1 a check failed (each failing
entry is named), 2 verification could not run (e.g. an unreadable public key).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from common.errors import FedtuneError

audit_app = typer.Typer(
    no_args_is_help=True, help="Verify privacy ledgers offline and write evidence reports."
)
site_app = typer.Typer(no_args_is_help=True, help="Site administration: ledger keys, the site worker.")
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@site_app.callback()
def _site() -> None:
    """Site administration: ledger signing keys, the site worker."""


def _fail(exc: FedtuneError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(2)


def parse_pubkeys(values: list[str]) -> dict[str, Path] | Path | None:
    """``--pubkey`` values: one ``FILE`` for every ledger, or any number of ``SITE=FILE``."""
    if not values:
        return None
    plain = [v for v in values if "=" not in v]
    if plain and len(values) > 1:
        raise FedtuneError(
            f"--pubkey {plain[0]}: with several keys, name each one's site: --pubkey SITE=FILE "
            "(SITE is the ledger's file name without .jsonl)"
        )
    if plain:
        return Path(plain[0])
    return {site: Path(path) for site, _, path in (v.partition("=") for v in values)}


@audit_app.command("verify")
def verify(
    ledgers: Annotated[list[Path], typer.Argument(help="Site ledger files (<site>.jsonl).")],
    pubkey: Annotated[
        list[str] | None,
        typer.Option(
            help="Public key: FILE for all ledgers, or SITE=FILE (repeatable). Requires signatures."
        ),
    ] = None,
    receipts: Annotated[
        Path | None, typer.Option(help="Coordinator run folder with receipts.jsonl (or the file itself).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
) -> None:
    """Check chain, signatures, round order and every epsilon; exit 0 only if all hold."""
    from privacy.audit import verify_ledgers

    try:
        result = verify_ledgers(ledgers, pubkeys=parse_pubkeys(pubkey or []), receipts=receipts)
    except FedtuneError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for audit in result.ledgers:
            eps = audit.epsilon
            status = "[green]OK[/green]" if audit.ok else "[red]FAILED[/red]"
            signed = f"signatures verified ({audit.key_fingerprint[:16]}...)" if audit.key_fingerprint else ""
            spent = (
                ""
                if eps is None
                else (
                    ", epsilon UNBOUNDED (records released without DP)"
                    if eps == float("inf")
                    else f", cumulative epsilon {eps:.4f}"
                )
            )
            console.print(
                f"{status} {escape(audit.path)}: {len(audit.entries)} entries{spent}"
                + (f", {signed}" if signed and audit.ok else "")
                + (", head record matched" if audit.head and audit.ok else "")
                + (f", {audit.receipts_checked} receipts matched" if result.receipts_path else "")
            )
        for finding in result.findings:
            style = "red" if finding.severity == "error" else "yellow"
            console.print(f"  [{style}]{escape(str(finding))}[/{style}]")
        console.print("all checks hold" if result.ok else "[red]verification FAILED[/red]")
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="Finished run folder (summary.json, ledgers/, ...).")],
    out: Annotated[Path, typer.Option(help="File to write.")] = Path("report.html"),
    fmt: Annotated[str, typer.Option("--format", help="html or json.")] = "html",
    pubkey: Annotated[list[str] | None, typer.Option(help="As for `audit verify`.")] = None,
) -> None:
    """Write the privacy office's evidence report: one self-contained HTML file, or JSON."""
    from privacy.report import build_report, write_html

    if fmt not in ("html", "json"):
        raise typer.BadParameter(f"must be html or json, got {fmt!r}", param_hint="--format")
    try:
        data = build_report(run_dir, pubkeys=parse_pubkeys(pubkey or []))
    except FedtuneError as exc:
        raise _fail(exc) from exc
    if fmt == "json":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    else:
        write_html(data, out)
    verdict = "all ledgers verified" if data["verification"]["ok"] else "LEDGER VERIFICATION FAILED"
    console.print(f"report written to [bold]{escape(str(out))}[/bold] ({verdict})")


@site_app.command("anchor")
def anchor(policy: Annotated[Path, typer.Argument(help="The site policy whose ledger to anchor.")]) -> None:
    """Write the ledger's head record again after an audit (it was lost, or the ledger predates it)."""
    from client.policy import load_policy
    from client.site import SiteAgent
    from privacy.ledger import PrivacyLedger
    from privacy.ledger_head import read_head, write_head

    try:
        pol = load_policy(policy)
        agent = SiteAgent(pol)
        plain = PrivacyLedger(pol.ledger_path, signer=agent.ledger.signer, site=pol.name)  # no head check
        entries = plain.entries()
        if read_head(pol.ledger_head) is not None:
            agent.ledger.state()  # an existing head must match: never overwrite evidence of a cut ledger
            console.print(
                f"{escape(str(pol.ledger_head))} already names the ledger's last entry; nothing to do"
            )
            return
        if not entries:
            raise FedtuneError(f"{pol.ledger_path}: no entries to anchor")
        last = entries[-1]
        write_head(
            pol.ledger_head,
            site=pol.name,
            ledger=pol.ledger_path,
            seq=last.seq,
            hash=last.hash,
            signer=plain.signer,
        )
    except FedtuneError as exc:
        raise _fail(exc) from exc
    console.print(
        f"anchored {escape(str(pol.ledger_path))} at entry seq {last.seq} in {escape(str(pol.ledger_head))}. "
        "Only do this after `fedtune audit verify` of the ledger against the coordinator's receipts."
    )


@site_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option(help="Folder for the key pair (created; existing keys are kept).")],
    passphrase_env: Annotated[
        str | None,
        typer.Option(help="Encrypt the private key with the passphrase in this environment variable."),
    ] = None,
) -> None:
    """Create the site's Ed25519 ledger-signing key pair (private key readable by owner only)."""
    from privacy.keys import generate_keypair, public_key_fingerprint

    passphrase = None
    if passphrase_env is not None:
        value = os.environ.get(passphrase_env)
        if not value:
            problem = f"--passphrase-env {passphrase_env}: that environment variable is unset or empty"
            raise _fail(FedtuneError(f"{problem}. Fix: export it first"))
        passphrase = value.encode("utf-8")
    try:
        private, public = generate_keypair(out, passphrase=passphrase)
    except FedtuneError as exc:
        raise _fail(exc) from exc
    console.print(f"private key: {private} (mode 600{', encrypted' if passphrase else ''}; never share it)")
    console.print(f"public key:  {public} (give this to auditors)")
    console.print(f"fingerprint: {public_key_fingerprint(public)}")


@site_app.command("serve")
def serve(
    policy: Annotated[Path, typer.Argument(help="The site policy.")],
    socket: Annotated[
        Path | None, typer.Option(help="The worker's Unix socket (default: <state-dir>/worker.sock).")
    ] = None,
    group: Annotated[
        str, typer.Option(help="The SuperNode user's group: it may reach the socket, not the data.")
    ] = "",
) -> None:
    """Keep this site's model, data and ledger warm in one process; the SuperNode hands it each round.

    Start the SuperNode with ``--node-config "worker='SOCKET'"`` (deploy/start-supernode.sh --worker).
    """
    import logging

    from client.worker import serve as run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    try:
        run_worker(policy, socket, group=group)
    except FedtuneError as exc:
        raise _fail(exc) from None
