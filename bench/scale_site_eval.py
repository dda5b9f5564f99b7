"""A round's held-out evaluation at a site vs its training, at 48 / 480 / 4,800 held-out notes.

Usage::

    .venv/bin/python -m bench.scale_site_eval [--sizes 48,480,4800] [--reps 3] [--threads 1]

The embedded tiny model (``$FEDTUNE_CACHE/tiny-model``, built if missing) with the run config's default
LoRA and training settings (max-seq-len, local-steps, batch-size, learning rate); synthetic notes of
one site (``embedded.synthdata``): 480 training notes, and ``N`` held-out notes per size. Measured side
by side in one process, every repetition in turn (medians reported):

- ``train``: one round of DP-SGD (``client.train.train_dp``, the site's train step, noise 1.0);
- ``old``: the previous held-out loss, every record, full-vocabulary logits at every position (the
  training path's ``row_nll`` in batches of 32), which a round ran twice (the train request's
  ``eval-loss-before`` and the evaluate message, on the same adapter);
- ``all``: ``client.records.held_out`` on every record (logits only where a target is predicted);
- ``default``: the same on the ``[evaluation] max-records`` sample (the default bound).

Ratios: ``before`` = 2 x old / train (two evaluations a round); ``unbounded`` = all / train and
``default`` = default / train (one evaluation a round: the other is a cache hit). The last line is
``eval_over_train_4800_default=<x>`` (goal: <= 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from client.compute import Compute, load_base, peft_for_dp
from client.evaluation import EvaluationSection, sample_held
from client.objectives import row_nll
from client.records import held_out
from client.tokens import Example, Tokenized, tokenize_examples
from client.train import DPPlan, train_dp
from common.config import RunConfig, default_run_config
from common.modeling import load_tokenizer
from embedded.synthdata import generate_site_records
from embedded.tiny import ensure_tiny_model

TRAIN_NOTES = 480


def _notes(n: int, seed: int, tokenizer: Any, max_len: int) -> tuple[Tokenized, list[str]]:
    records, _ = generate_site_records(0, n, seed=seed)
    examples = [Example(r["instruction"], r["response"]) for r in records]
    return tokenize_examples(examples, tokenizer, max_len), [e.text for e in examples]


@torch.no_grad()
def old_eval(model: torch.nn.Module, held: Tokenized, batch: int = 32) -> float:
    """The previous ``evaluate_loss``: full logits at every position, rows in order."""
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, held.ids.size(0), batch):
        nll, tokens = row_nll(model, held.ids[i : i + batch], held.roles[i : i + batch])
        total, count = total + float(nll.sum()), count + float(tokens.sum())
    model.train()
    return total / max(count, 1.0)


def _seconds(fn: Callable[..., object], *args: Any, **kw: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - start


def run(sizes: list[int], reps: int, log: Callable[[str], None] = print) -> dict[str, float]:
    """Median seconds of each phase at each size, and the ratios (see the module docstring)."""
    cfg = RunConfig.from_flower(default_run_config())
    t = cfg.train
    model_dir = ensure_tiny_model(Path(os.environ.get("FEDTUNE_CACHE", ".fedtune/cache")) / "tiny-model")
    tokenizer = load_tokenizer(model_dir)
    compute = Compute("cpu", "float32", "none", False, None)
    model = peft_for_dp(load_base(model_dir, compute), cfg.lora, compute)
    train, _ = _notes(TRAIN_NOTES, 11, tokenizer, t.max_seq_len)
    plan = DPPlan(1.0, t.batch_size / train.records, t.local_steps, t.max_grad_norm, t.batch_size)
    bound = EvaluationSection().max_records
    held = {n: _notes(n, 100 + n, tokenizer, t.max_seq_len) for n in sizes}
    samples = {n: (sample_held(h, texts, 0), sample_held(h, texts, bound)) for n, (h, texts) in held.items()}
    log(f"tiny model {model_dir}; {TRAIN_NOTES} training notes; max-seq-len {t.max_seq_len}; "
        f"{t.local_steps} steps x batch {t.batch_size}; default max-records {bound}; "
        f"{torch.get_num_threads()} thread(s); {reps} rep(s)")  # fmt: skip
    train_dp(model, train.ids, train.roles, plan, learning_rate=t.learning_rate)  # warm-up, not timed
    held_out(t, model, samples[min(sizes)][1])
    times: dict[str, list[float]] = {}
    for _ in range(reps):
        step = _seconds(train_dp, model, train.ids, train.roles, plan, learning_rate=t.learning_rate)
        times.setdefault("train", []).append(step)
        for n in sizes:
            full, bounded = samples[n]
            times.setdefault(f"old_{n}", []).append(_seconds(old_eval, model, held[n][0]))
            times.setdefault(f"all_{n}", []).append(_seconds(held_out, t, model, full))
            times.setdefault(f"default_{n}", []).append(_seconds(held_out, t, model, bounded))
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, float] = {}
    log(f"train round: {med['train']:.2f} s")
    head = ("held-out", 9), ("old s", 8), ("all s", 8), ("default s", 10), ("before", 7), ("unbounded", 10)
    log(" ".join(f"{h:>{w}}" for h, w in head) + f" {'default':>8}")
    for n in sizes:
        out |= {f"eval_over_train_{n}_before": 2 * med[f"old_{n}"] / med["train"],
                f"eval_over_train_{n}_unbounded": med[f"all_{n}"] / med["train"],
                f"eval_over_train_{n}_default": med[f"default_{n}"] / med["train"]}  # fmt: skip
        log(f"{n:>9} {med[f'old_{n}']:>8.2f} {med[f'all_{n}']:>8.2f} {med[f'default_{n}']:>10.2f} "
            f"{out[f'eval_over_train_{n}_before']:>7.2f} {out[f'eval_over_train_{n}_unbounded']:>10.2f} "
            f"{out[f'eval_over_train_{n}_default']:>8.2f}")  # fmt: skip
        log(f"  per note: old {1e3 * med[f'old_{n}'] / n:.1f} ms, new {1e3 * med[f'all_{n}'] / n:.1f} ms")
        every, some = (held_out(t, model, s) for s in samples[n])
        log(f"  eval-loss: all {every['eval-loss']:.4f}, default {some['eval-loss']:.4f} "
            f"+- {some['eval-loss-stderr']:.4f} ({some['eval-records']:.0f} records)")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the last line is ``eval_over_train_<largest>_default=<x>``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="48,480,4800", help="held-out notes, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every phase (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    out = run(sizes, args.reps)
    last = max(sizes)
    print(f"eval_over_train_{last}_default={out[f'eval_over_train_{last}_default']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
