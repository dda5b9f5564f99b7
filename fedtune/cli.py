"""The ``fedtune`` command: one entry point for the operator, the site and the auditor."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.errors import FedtuneError
from common.runfolder import RunFolder
from fedtune.audit_cli import audit_app, site_app
from fedtune.deploy_cli import deploy_app
from fedtune.scrub_cli import prepare, scrub

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Base models.")
data_app = typer.Typer(no_args_is_help=True, help="Embedded data.")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
console = Console()
app.command("scrub")(scrub)
app.add_typer(audit_app, name="audit", help="Offline verification and evidence for the privacy office.")
site_app.command("prepare")(prepare)
app.add_typer(
    site_app, name="site", help="Site set-up: ledger signing keys, data preparation, the site worker."
)
app.add_typer(deploy_app, name="deploy", help="Provision a real federation: CA, TLS, node and ledger keys.")


@model_app.command("tiny")
def model_tiny(out: Annotated[Path, typer.Option(help="Folder to write the model to.")]) -> None:
    """Build the embedded tiny Llama-architecture model and its tokenizer locally."""
    from embedded.tiny import build_tiny_model

    path = build_tiny_model(out, progress=lambda s: console.print(f"[dim]{s}[/dim]"))
    console.print(f"tiny model written to [bold]{path}[/bold]")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder for one JSONL per site.")],
    sites: Annotated[int, typer.Option(min=1, help="Number of sites.")] = 3,
    records: Annotated[int, typer.Option(min=10, help="Records per site.")] = 240,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            help="sft (instructions), cpt (raw documents, OUT/cpt/), dpo (pairs, OUT/dpo/); default all."
        ),
    ] = None,
) -> None:
    """Write synthetic, non-IID, PII-laden clinical notes for each site."""
    from embedded.synthdata import KINDS, write_synthetic_sites

    kinds = tuple(kind or KINDS)
    if unknown := sorted(set(kinds) - set(KINDS)):
        console.print(f"[red]--kind {unknown[0]!r} is not one of {', '.join(KINDS)}[/red]")
        raise typer.Exit(2)
    for p in write_synthetic_sites(out, sites=sites, records_per_site=records, seed=seed, kinds=kinds):
        console.print(f"wrote {p}")


def _parse_run_config(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedtuneError(f"--run-config '{item}' must look like key=value")
        v: Any = value
        for cast in (int, float):
            try:
                v = cast(value)
                break
            except ValueError:
                continue
        out[key.strip()] = v
    return out


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A readable per-site table of the run."""
    table = Table(title=f"fedtune run {summary['run_id']} -- {summary['rounds']} rounds")
    table.add_column("site", no_wrap=True)
    for col in ("rounds", "epsilon", "budget", "eval before", "eval after", "notes"):
        table.add_column(col)
    for name, s in summary["sites"].items():
        before, after = s.get("eval_loss_before"), s.get("eval_loss_after")
        notes = "; ".join(r["reason"][:60] for r in s.get("refusals", []) + s.get("failures", []))
        table.add_row(
            escape(name),
            str(s.get("rounds_trained", 0)),
            f"{s['epsilon']:.3f}" if "epsilon" in s else "NO DP",
            f"{s.get('max_epsilon', 0.0):g}",
            f"{before:.4f}" if before is not None else "-",
            f"{after:.4f}" if after is not None else "-",
            escape(notes),
        )
    console.print(table)
    base = summary["base_model"]["bytes"]
    console.print(
        f"adapter {summary['adapter_bytes']:,} B = {summary['adapter_bytes'] / max(1, base):.2%} of the base "
        f"model ({base:,} B); all sites sent {summary['bytes_up']:,} B and received "
        f"{summary['bytes_down']:,} B in total"
    )
    rejected = [
        (n, f)
        for n, s in summary["sites"].items()
        for f in s.get("failures", [])
        if f["status"] == "rejected"
    ]
    crashed = [
        (n, f) for n, s in summary["sites"].items() for f in s.get("failures", []) if f["status"] == "failed"
    ]
    console.print(f"rejected updates: {len(rejected)}; failed or silent sites: {len(crashed)}")
    for name, f in rejected + crashed:
        console.print(
            f"  round {f['round']} {escape(name)} {f['status']}: {escape(f['reason'][:160])}", highlight=False
        )
    for name, flags in summary.get("flags", {}).items():
        for problem in flags:
            console.print(f"[bold red]flagged[/bold red] {escape(name)}: {escape(problem)}", highlight=False)
    if summary.get("status") == "stopped":
        console.print(
            f"[bold red]run stopped:[/bold red] {escape(summary['stop_reason'])} -- resume with "
            f"--resume {escape(str(out))}"
        )
    console.print(f"run folder: [bold]{out}[/bold] (adapter/, ledgers/, metrics.jsonl, summary.json)")


@app.command()
def simulate(
    out: Annotated[Path | None, typer.Option(help="Run folder to create.")] = None,
    sites: Annotated[int, typer.Option(min=1, help="Number of simulated sites.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 12,
    model: Annotated[Path | None, typer.Option(help="Local base model folder (default: tiny).")] = None,
    data: Annotated[Path | None, typer.Option(help="Folder with one data file per site.")] = None,
    max_epsilon: Annotated[float, typer.Option(help="Each site's privacy budget.")] = 8.0,
    delta: Annotated[float, typer.Option(help="Each site's delta.")] = 1e-5,
    run_config: Annotated[list[str] | None, typer.Option(help="Extra run config, key=value.")] = None,
    local_only: Annotated[bool, typer.Option(help="Baseline: every site trains alone.")] = False,
    no_dp: Annotated[bool, typer.Option(help="Baseline: train without DP (synthetic data only).")] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this interrupted run folder from its last checkpoint.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="TESTING ONLY: seeds the DP noise too, so the run is NOT private.")
    ] = None,
    device: Annotated[str, typer.Option(help="Sites' [compute] device: auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="Sites' base weights: auto, float32, bfloat16, float16.")
    ] = "auto",
    quantization: Annotated[str, typer.Option(help="Sites' base model: none, nf4 (QLoRA), int8.")] = "none",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Sites recompute activations in backward (less memory).")
    ] = False,
) -> None:
    """Run N sites x R rounds on Flower's Simulation Engine and summarize."""
    from fedtune.simulate import resume as run_resume
    from fedtune.simulate import simulate as run

    def on_round(line: dict[str, Any]) -> None:
        parts = []
        for site, row in line["sites"].items():
            ev = row.get("eval-loss")
            parts.append(
                f"{escape(site)}: {row.get('status', '?')}"
                + (f" eps={row['epsilon']:.2f}" if "epsilon" in row else "")
                + (f" eval={ev:.3f}" if ev is not None else "")
                + (f" margin={row['reward-margin']:.2f}" if "reward-margin" in row else "")
                + (f" acc={row['reward-accuracy']:.2f}" if "reward-accuracy" in row else "")
            )
        console.print(
            f"[bold]round {line['round']}/{planned}[/bold] ({line['time']:.0f}s) " + " | ".join(parts)
        )

    if (out is None) == (resume is None):
        raise FedtuneError("give either --out RUN_DIR (a new run) or --resume RUN_DIR (continue one)")
    planned = rounds
    if resume is not None:
        # a missing or broken simulation.json is reported by resume() itself
        with contextlib.suppress(OSError, ValueError, LookupError, AttributeError, TypeError):
            spec = json.loads(RunFolder(resume).simulation.read_text(encoding="utf-8"))
            planned = spec["overrides"].get("num-server-rounds", rounds)
        console.print(f"resuming {resume} from its last checkpoint ...")
        summary = run_resume(resume, on_round=on_round)
        print_summary(summary, resume)
        return
    assert out is not None
    console.print(f"simulating {sites} sites x {rounds} rounds into {out} ...")
    extra = _parse_run_config(run_config or [])
    if seed is not None:
        extra["seed"] = seed
        console.print(
            f"[bold red]--seed {seed}: DP noise is reproducible, so this run is NOT PRIVATE "
            "(testing only; the simulated sites' policies opt in with allow-seeded-noise)[/bold red]"
        )
    if no_dp:
        extra["dp"] = False
        console.print(
            "[bold red]--no-dp: sites train WITHOUT differential privacy (baseline only)[/bold red]"
        )
    summary = run(
        out,
        sites=sites,
        rounds=rounds,
        model=model,
        data=data,
        max_epsilon=max_epsilon,
        delta=delta,
        run_config=extra,
        on_round=on_round,
        local_only=local_only,
        compute={
            "device": device,
            "dtype": dtype,
            "quantization": quantization,
            "gradient-checkpointing": gradient_checkpointing,
        },
    )
    print_summary(summary, out)


def main() -> None:
    """Console entry point: user errors print a clear message and exit 2, no traceback."""
    try:
        app()
    except FedtuneError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
