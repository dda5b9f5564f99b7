"""``fedtune site prepare --policy site.toml [--workers N]``: the site's data, ready for rounds.

Registered by :mod:`fedtune.cli` as a ``site`` subcommand. Runs :func:`client.prepare.prepare_site`
with a progress bar (notes/s) and prints one summary line per training kind; a rerun after a kill
or after records were added scrubs only what is not prepared yet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from common.errors import FedtuneError

console = Console()


class _Rate(ProgressColumn):
    """Notes scrubbed per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} notes/s" if task.speed else "- notes/s", style="progress.data.speed")


def prepare(
    policy: Annotated[Path, typer.Option(help="The site policy (records, PII settings, state dir).")],
    workers: Annotated[
        int, typer.Option(min=1, help="Scrubbing processes (default: this machine's CPUs).")
    ] = os.cpu_count() or 1,
    kind: Annotated[
        list[str] | None, typer.Option(help="Only this kind (repeatable); default: every kind with records.")
    ] = None,
) -> None:
    """Validate, scrub, split and fingerprint the site's records once, before any round.

    Run it before `fedtune site serve` and again whenever the data or the [pii] settings change
    (then restart the site worker); rounds read only what it prepared.
    """
    from client.policy import load_policy
    from client.prepare import KINDS, prepare_site

    if unknown := sorted(set(kind or ()) - set(KINDS)):
        raise typer.BadParameter(f"{unknown[0]!r} is not one of {', '.join(KINDS)}", param_hint="--kind")
    try:
        pol = load_policy(policy)
        console.print(f"preparing site [bold]{escape(pol.name)}[/bold] with {workers} worker(s) ...")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate())
        with Progress(*columns, TimeRemainingColumn(), console=console, transient=False) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(k: str, done: int, total: int) -> None:
                if k not in tasks:
                    tasks[k] = bar.add_task(f"scrubbing {k}", total=total)
                bar.update(tasks[k], completed=done)

            results = prepare_site(pol, workers=workers, kinds=kind, progress=progress)
    except FedtuneError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    for r in results:
        console.print(escape(r.summary()), highlight=False)
    records, new = sum(r.records for r in results), sum(r.new for r in results)
    seconds = sum(r.seconds for r in results)
    console.print(
        f"prepared {records} records ({new} new, {records - new} reused) in {seconds:.1f} s, "
        f"{records / max(seconds, 1e-9):.1f} notes/s; scrub report(s) in {escape(str(pol.state_dir))}",
        highlight=False,
    )
    if any(r.changed for r in results):
        console.print("restart a running site worker (fedtune site serve) so that its rounds use it")
