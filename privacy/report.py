"""Evidence report for a site's privacy office: one self-contained HTML file (or JSON).

:func:`build_report` gathers everything from a finished run folder (``summary.json``,
``metrics.jsonl``, ``ledgers/``, ``adapter/``, optional ``receipts.jsonl``) and
re-verifies every ledger with :func:`privacy.audit.verify_ledgers`.
:func:`write_html` renders it with plots drawn by matplotlib's Agg backend and
inlined as base64 ``data:`` URIs; the page loads nothing from anywhere else.
"""

from __future__ import annotations

import base64
import html
import io
import math
import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.errors import FedtuneError
from common.fsutil import file_sha256
from common.runfolder import RunFolder
from privacy.audit import LedgerAudit, verify_ledgers

__all__ = ["SOFTWARE", "build_report", "guarantee_text", "write_html"]

SOFTWARE = (
    *("fedtune", "torch", "opacus", "flwr", "peft", "transformers"),
    *("presidio-analyzer", "presidio-anonymizer", "cryptography"),
)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def guarantee_text(max_epsilon: float, delta: float) -> str:
    """Plain-language meaning of record-level (epsilon, delta)-DP at the run's largest epsilon."""
    factor = math.exp(max_epsilon)
    return (
        "Every site trained its model update with record-level differential privacy (DP-SGD). "
        "For any single patient or customer, the outcome of training (everything the coordinator "
        "received and the final adapter) is almost equally likely whether or not that person's record "
        f"was in the site's training data: at most {factor:,.1f} times more or less likely "
        f"(e^epsilon, epsilon = {max_epsilon:.2f}), except with a probability of at most "
        f"delta = {delta:g}. This holds whatever else an attacker knows. Epsilon adds up over rounds "
        "and runs; the values shown are each site's cumulative totals, checked against its own budget. "
        "Smaller is stronger: epsilon near 1 is strong, single digits are common in practice, and large "
        "values promise little. The guarantee protects individual records, not patterns shared by many "
        "records (learning those is the point of training); a person with k records is protected "
        "roughly k times less. Identifiers were also scrubbed before training, as a separate defence. "
        "Reported loss values are aggregates and are not covered by this guarantee."
    )


def _load_run(run: RunFolder) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        return run.read_summary(), run.read_metrics()
    except FileNotFoundError as exc:
        raise FedtuneError(
            f"{exc.filename}: not found. Fix: pass the folder written by `fedtune simulate` (or the "
            "coordinator's out-dir), which holds summary.json, metrics.jsonl and ledgers/"
        ) from None
    except ValueError as exc:
        raise FedtuneError(f"{run.root}: unreadable run record ({exc}). Fix: restore it from backup") from exc


def _headline(audits: Mapping[str, LedgerAudit]) -> tuple[str, dict[str, Any]]:
    """The guarantee statement, from the verified ledgers alone (never from the coordinator's summary)."""
    budgets: dict[str, Any] = {}
    for name, audit in audits.items():
        reserves = [e for e in audit.entries if e.parameters]
        last = reserves[-1].parameters if reserves else {}
        budgets[name] = {
            "epsilon": audit.epsilon,
            "epsilon_recomputed": reserves[-1].epsilon_recomputed if reserves else None,
            "delta": last.get("delta"),
            "max_epsilon": last.get("max_epsilon"),
            "private": all(e.private for e in audit.entries),
            "verified": audit.ok,
        }
    if not audits:
        return "No site ledger was found in ledgers/: no privacy guarantee can be stated.", budgets
    if not all(b["verified"] for b in budgets.values()):
        failed = ", ".join(n for n, b in budgets.items() if not b["verified"])
        if not all(b["private"] for b in budgets.values()):
            return (
                f"NOT PRIVATE: the ledger of {failed} records rounds with seeded noise or without "
                "differential privacy; no epsilon guarantee holds for them. See the findings below.",
                budgets,
            )
        return (
            f"LEDGER VERIFICATION FAILED for {failed}: no privacy guarantee is stated until every ledger "
            "verifies. See the findings below.",
            budgets,
        )
    eps = [b["epsilon"] for b in budgets.values() if isinstance(b["epsilon"], float)]
    deltas = [b["delta"] for b in budgets.values() if isinstance(b["delta"], float)]
    return guarantee_text(max(eps, default=0.0), max(deltas, default=0.0)), budgets


def build_report(run_dir: Path, *, pubkeys: Mapping[str, Path] | Path | None = None) -> dict[str, Any]:
    """Collect the evidence of one run folder into a JSON-ready dict.

    The headline -- each site's epsilon, budget, delta and the guarantee text -- comes from the
    verified ledgers, never from the coordinator's ``summary.json`` (which supplies the losses, scrub
    counts and what the coordinator saw).

    Parameters
    ----------
    run_dir
        A finished run folder (``summary.json``, ``metrics.jsonl``, ``ledgers/``, ``adapter/``).
    pubkeys
        Sites' public keys, passed to :func:`privacy.audit.verify_ledgers`; by default
        ``run_dir/keys/<site>.pub`` when that folder exists (else signatures are not checked).

    Raises
    ------
    FedtuneError
        ``run_dir`` is not a run folder, or a public key cannot be loaded.
    """
    run = RunFolder(Path(run_dir))
    summary, metrics = _load_run(run)
    if pubkeys is None and run.keys.is_dir():  # public keys as the sites handed them over
        pubkeys = run.public_keys()
    receipts = run.receipts if run.receipts.is_file() else None
    audit = verify_ledgers(run.collected_ledgers(), pubkeys=pubkeys, receipts=receipts)
    ledgers = {a.site: a for a in audit.ledgers}
    guarantee, budgets = _headline(ledgers)
    sites: dict[str, Any] = {}
    for name in sorted(set(summary.get("sites", {})) | set(ledgers)):
        s = summary.get("sites", {}).get(name, {})
        b = budgets.get(name, {})
        eps = b.get("epsilon")
        site: dict[str, Any] = {"epsilon": eps if eps is None or math.isfinite(eps) else "unbounded"}
        site |= {k: b.get(k) for k in ("epsilon_recomputed", "delta", "max_epsilon", "private")}
        site |= {"rounds_trained": s.get("rounds_trained"), "epsilon_rdp": s.get("epsilon_rdp")}
        site |= {k: s.get(k) for k in ("eval_loss_before", "eval_loss_after")}
        site |= {"scrub": dict(s.get("scrub", {})), "refusals": s.get("refusals", [])}
        site |= {"failures": s.get("failures", []), "epsilon_before_run": 0.0, "rounds": []}
        la = ledgers.get(name)
        site["verification"] = {
            "ledger": la.path if la else None,
            "ok": bool(la and la.ok),
            "entries": len(la.entries) if la else 0,
            "signatures": f"verified with key {la.key_fingerprint}"
            if la and la.key_fingerprint
            else "not checked",
            "receipts_checked": la.receipts_checked if la else 0,
            "head": la.head if la else None,
            "findings": [str(f) for f in la.findings] if la else [f"no ledger for site {name} in ledgers/"],
        }
        for e in la.entries if la else []:
            if e.kind == "reserve" and e.parameters:
                if e.run_id != summary.get("run_id"):
                    site["epsilon_before_run"] = e.parameters["epsilon"]
                    continue
                row = {"round": e.round, **e.parameters, "epsilon_recomputed": e.epsilon_recomputed}
                site["rounds"].append(row | {"accountant": e.parameters.get("accountant")})
        sites[name] = site
    loss: dict[str, dict[str, list[Any]]] = {}
    for line in metrics:
        for name, m in line.get("sites", {}).items():
            curve = loss.setdefault(name, {"round": [], "train_loss": [], "eval_loss": []})
            if not curve["round"] and m.get("eval-loss-before") is not None:
                curve["round"].append(0)
                curve["train_loss"].append(None)
                curve["eval_loss"].append(m["eval-loss-before"])
            curve["round"].append(line.get("round"))
            curve["train_loss"].append(m.get("train-loss"))
            curve["eval_loss"].append(m.get("eval-loss"))
    files = sorted(p for p in run.adapter.rglob("*") if p.is_file()) if run.adapter.is_dir() else []
    return {
        "run_id": summary.get("run_id"),
        "run_dir": str(run.root.resolve()),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": summary.get("rounds"),
        "guarantee": guarantee,
        "sites": sites,
        "loss": loss,
        "verification": {
            "ok": audit.ok,
            "receipts": audit.receipts_path,
            "findings": [str(f) for f in audit.findings],
        },
        "software": _versions(),
        "fingerprints": {
            "base_model": summary.get("base_model", {}),
            "adapter": {str(p.relative_to(run.adapter)): file_sha256(p) for p in files},
        },
    }


def _png(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (Agg canvas, no metadata links)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _epsilon_plot(report: Mapping[str, Any]) -> str:
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.add_subplot()
    for i, (name, site) in enumerate(report["sites"].items()):
        color = f"C{i % 10}"
        rounds = [0] + [r["round"] for r in site["rounds"]]
        eps = [site["epsilon_before_run"]] + [r["epsilon"] for r in site["rounds"]]
        ax.plot(rounds, eps, marker="o", color=color, label=f"{name} (epsilon)")
        if site.get("max_epsilon") is not None:
            ax.axhline(site["max_epsilon"], color=color, linestyle="--", linewidth=1, label=f"{name} budget")
    ax.set(xlabel="round (0 = before this run)", ylabel="cumulative epsilon", title="Privacy spent vs budget")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _loss_plot(report: Mapping[str, Any]) -> str:
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for i, (name, curve) in enumerate(report["loss"].items()):
        for ax, key in zip(axes, ("train_loss", "eval_loss"), strict=True):
            points = [(r, v) for r, v in zip(curve["round"], curve[key], strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=f"C{i % 10}", label=name)
    for ax, title in zip(
        axes, ("training loss (DP-SGD)", "held-out eval loss (0 = base model)"), strict=True
    ):
        ax.set(xlabel="round", ylabel="loss", title=title)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return _png(fig)


def _scrub_plot(report: Mapping[str, Any]) -> str:
    types = sorted({t for site in report["sites"].values() for t in site["scrub"]})
    fig = Figure(figsize=(7.5, 0.35 * max(len(types), 3) * max(len(report["sites"]), 1) / 2 + 1.2))
    ax = fig.add_subplot()
    height = 0.8 / max(len(report["sites"]), 1)
    for i, (name, site) in enumerate(report["sites"].items()):
        ys = [j + i * height for j in range(len(types))]
        ax.barh(ys, [site["scrub"].get(t, 0) for t in types], height=height, color=f"C{i % 10}", label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(types))], types, fontsize=8)
    ax.set(xlabel="values replaced before training", title="PII scrubbed per entity type")
    ax.legend(fontsize=7)
    return _png(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else ("" if value is None else str(value))
        return html.escape(text)

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_MECHANISM: tuple[str, ...] = (
    "round",
    "train_kind",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "delta",
    "accountant",
)
_MECHANISM += ("epsilon", "epsilon_recomputed", "epsilon_rdp", "max_epsilon")
_BUDGET = ("rounds_trained", "epsilon", "epsilon_recomputed", "delta", "max_epsilon", "private")
_HEADERS = {"max_grad_norm": "clip norm", "max_epsilon": "budget", "epsilon": "epsilon (PRV)"}
_HEADERS |= {"epsilon_rdp": "epsilon (RDP)", "epsilon_recomputed": "epsilon recomputed", "private": "private"}
_HEADERS |= {
    "rounds_trained": "rounds trained",
    "noise_multiplier": "noise mult.",
    "sample_rate": "sample rate",
    "train_kind": "kind",
}


def _refusals(site: Mapping[str, Any]) -> str:
    return "; ".join(str(r.get("reason", r)) for r in site["refusals"]) or "none"


_CSS = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f0f0f0}.ok{color:#0a6d1f;font-weight:bold}.bad{color:#b00020;font-weight:bold}
img{max-width:100%}code{font-size:12px;word-break:break-all}
.note{background:#f6f8fa;padding:1em;border-left:4px solid #4a7}"""


def write_html(report: Mapping[str, Any], out_path: Path) -> Path:
    """Render ``report`` (from :func:`build_report`) as one self-contained HTML file.

    Returns
    -------
    Path
        ``out_path``; its images are inline ``data:`` URIs and it references no other resource.
    """
    sites = report["sites"]
    e = html.escape
    mechanism_rows = [
        [name, *(r[c] for c in _MECHANISM)] for name, site in sites.items() for r in site["rounds"]
    ]
    types = sorted({t for site in sites.values() for t in site["scrub"]})
    verify_rows = []
    for name, site in sites.items():
        v = site["verification"]
        status = '<span class="ok">VERIFIED</span>' if v["ok"] else '<span class="bad">FAILED</span>'
        found = "<br>".join(e(f) for f in v["findings"]) or "none"
        verify_rows.append(
            f"<tr><td>{e(name)}</td><td>{status}</td><td>{v['entries']}</td><td>{e(v['signatures'])}</td>"
            f"<td>{v['receipts_checked']}</td><td>{found}</td></tr>"
        )
    overall = report["verification"]["ok"]
    fp = report["fingerprints"]
    base = fp.get("base_model", {})
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fedtune privacy evidence "
        f"{e(str(report['run_id']))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Privacy evidence report</h1><p>Run <code>{e(str(report['run_id']))}</code>, "
        f"{e(str(report['rounds']))} rounds, folder <code>{e(report['run_dir'])}</code>; generated "
        f"{e(report['generated_at'])}. Ledger verification: "
        + ('<span class="ok">ALL VERIFIED</span>' if overall else '<span class="bad">FAILED</span>')
        + "</p>",
        f"<h2>What the guarantee means</h2><p class='note'>{e(report['guarantee'])}</p>",
        "<h2>Privacy budget per site</h2>",
        _table(
            ["site", *(_HEADERS.get(c, c) for c in _BUDGET), "refusals"],
            [[n, *(s[k] for k in _BUDGET), _refusals(s)] for n, s in sites.items()],
        ),
        f"<img alt='cumulative epsilon per round against each site budget' src='{_epsilon_plot(report)}'>",
        "<h2>Mechanism parameters (from the ledgers)</h2>",
        _table(
            ["site", *(_HEADERS.get(c, c) for c in _MECHANISM)],
            mechanism_rows,
        ),
        "<h2>Ledger verification</h2><table><thead><tr><th>site</th><th>status</th><th>entries</th>"
        "<th>signatures</th><th>receipts matched</th><th>findings</th></tr></thead><tbody>"
        + "".join(verify_rows)
        + "</tbody></table>",
        "<h2>PII scrubbed before training (counts, never values)</h2>",
        _table(
            ["entity type", *sites], [[t] + [s["scrub"].get(t, 0) for s in sites.values()] for t in types]
        ),
        f"<img alt='scrub counts per entity type' src='{_scrub_plot(report)}'>",
        "<h2>Training and evaluation loss</h2>",
        f"<img alt='training and held-out loss per round' src='{_loss_plot(report)}'>",
        "<h2>Software and model fingerprints</h2>",
        _table(["component", "version"], [[k, v] for k, v in report["software"].items()]),
        _table(
            ["artifact", "sha256"],
            [[f"base model {base.get('path', '')} ({base.get('bytes', '?')} bytes)", base.get("fingerprint")]]
            + [[f"adapter/{name}", digest] for name, digest in fp["adapter"].items()],
        ),
        "</body></html>",
    ]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path
