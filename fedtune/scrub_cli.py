"""``fedtune scrub INPUT --out OUTPUT`` and ``fedtune site prepare --policy PATH [--workers N]``.

``scrub`` (registered by :mod:`fedtune.cli` with ``app.command("scrub")(scrub)``) scrubs PII from a
JSONL, CSV or Parquet file: the same records in the same order, the named string fields scrubbed,
every other field copied untouched; output and report are written atomically (temp + rename).

``prepare`` (a ``site`` subcommand) runs :func:`client.prepare.prepare_site` -- the site's data,
validated, scrubbed, split and fingerprinted once, ready for rounds -- with a progress bar (notes/s)
and one summary line per training kind; a rerun after a kill or after records were added scrubs only
what is not prepared yet.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

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

from common.errors import DataError, FedtuneError
from common.fsutil import atomic_write_bytes
from privacy.pii import ScrubConfig, ScrubReport, get_scrubber

DEFAULT_FIELDS = ("instruction", "response")
console = Console()


def _line_numbers(path: Path, count: int) -> list[int]:
    """Line (JSONL) or row (CSV: header is line 1; Parquet: row) number of each record."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, "rb") as fh:
            lines = [n for n, raw in enumerate(fh, start=1) if raw.strip()]
        return lines[:count]
    return [i + (2 if suffix == ".csv" else 1) for i in range(count)]


def _check_fields(path: Path, records: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    """Raise DataError for a named field that is not text, or that no record has."""
    for f in fields:
        if not any(f in r for r in records):
            raise DataError(
                str(path),
                None,
                f"no record has the field '{f}'",
                "check the --field names (or the policy's text-fields)",
            )
    lines: list[int] | None = None
    for index, record in enumerate(records):
        for f in fields:
            value = record.get(f)
            if value is not None and not isinstance(value, str):
                lines = lines or _line_numbers(path, len(records))
                raise DataError(
                    str(path),
                    lines[index],
                    f"field '{f}' is a {type(value).__name__}, not text",
                    f"store '{f}' as a string or leave it out of --field",
                )


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write records as JSONL, CSV or Parquet (by ``path``'s suffix), atomically.

    Raises
    ------
    DataError
        The suffix is not ``.jsonl``, ``.json``, ``.csv`` or ``.parquet``.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_bytes(path, text.encode("utf-8"))
    elif suffix == ".csv":
        names = list(dict.fromkeys(k for r in records for k in r))
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(list(records)), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
    else:
        raise DataError(
            str(path), None, f"unsupported output type '{path.suffix}'", "use .jsonl, .csv or .parquet"
        )


def config_from_policy(policy: Path) -> tuple[ScrubConfig, tuple[str, ...]]:
    """The scrub settings and text fields of a site policy's ``[pii]`` and ``[data]`` sections.

    Raises
    ------
    ConfigError
        The policy is invalid or its pseudonym key file cannot be read.
    """
    from client.policy import load_policy, scrub_config

    pol = load_policy(policy)
    config = scrub_config(pol)
    return config, pol.data.text_fields


def scrub_file(
    input_path: Path,
    output_path: Path,
    fields: Sequence[str],
    config: ScrubConfig,
    *,
    report_path: Path | None = None,
    workers: int = 1,
) -> ScrubReport:
    """Scrub ``fields`` of every record of ``input_path`` into ``output_path``.

    Parameters
    ----------
    input_path, output_path
        JSONL, CSV or Parquet files (format by suffix; they may differ).
    fields
        String fields to scrub; all other fields are copied untouched.
    config
        Scrub settings.
    report_path
        Where to write the JSON report (counts per entity type, never values).
    workers
        Worker processes for the scrubber.

    Returns
    -------
    ScrubReport
        Counts per entity type and records touched.

    Raises
    ------
    DataError
        Unreadable input (with file and line), a non-text named field, or a field no
        record has.
    """
    from client.data import load_records

    records = load_records(input_path, [], max_chars=2**62)
    _check_fields(input_path, records, fields)
    scrubbed, report = get_scrubber(config).scrub_records(records, fields, workers=workers)
    write_records(output_path, scrubbed)
    if report_path is not None:
        body = {
            "input": input_path.name,
            "fields": list(fields),
            "spacy_model": config.spacy_model,
            "operator": config.operator,
            "entity_operators": dict(config.entity_operators),
            **report.to_dict(),
        }
        atomic_write_bytes(report_path, (json.dumps(body, indent=1) + "\n").encode("utf-8"))
    return report


def scrub(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="JSONL, CSV or Parquet file to scrub.")],
    out: Annotated[Path, typer.Option("--out", help="Output file (.jsonl, .csv or .parquet).")],
    field: Annotated[
        list[str] | None,
        typer.Option(
            "--field",
            help="Text field to scrub (repeatable). Default: the policy's text-fields "
            "or instruction + response.",
        ),
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write counts per entity type here (JSON).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Site policy TOML: uses its [pii] section.")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Scrub PII from the named text fields of a file; other fields and the order are kept."""
    config, policy_fields = (
        config_from_policy(policy) if policy is not None else (ScrubConfig(), DEFAULT_FIELDS)
    )
    fields = tuple(field) if field else policy_fields
    result = scrub_file(input_path, out, fields, config, report_path=report, workers=workers)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(result.counts.items())) or "nothing found"
    typer.echo(f"scrubbed {result.records} records ({result.records_touched} touched) -> {out}: {counts}")


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
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for r in results:
        console.print(escape(r.summary()), highlight=False, soft_wrap=True)
    records, new = sum(r.records for r in results), sum(r.new for r in results)
    seconds = sum(r.seconds for r in results)
    console.print(
        f"prepared {records} records ({new} new, {records - new} reused) in {seconds:.1f} s, "
        f"{records / max(seconds, 1e-9):.1f} notes/s; scrub report(s) in {escape(str(pol.state_dir))}",
        highlight=False,
        soft_wrap=True,
    )
    if any(r.changed for r in results):
        console.print("restart a running site worker (fedtune site serve) so that its rounds use it")
