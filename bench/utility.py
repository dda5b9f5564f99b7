"""Utility of privacy and federation on the embedded benchmark, measured side by side in one run.

Runs the same 3 synthetic hospitals x R rounds four ways -- federated DP-LoRA, federated DP
FFA-LoRA (B only), local-only DP-LoRA (each site alone, same budget) and federated LoRA without
DP -- and prints held-out loss per site as a markdown table (docs/privacy.md quotes a run).

Usage: ``python -m bench.utility [--rounds 12] [--max-epsilon 8] [--out runs/utility]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedtune.simulate import default_data, default_model, simulate

MODES: dict[str, dict[str, Any]] = {
    "federated DP (LoRA)": {"run_config": {}},
    "federated DP (FFA-LoRA)": {"run_config": {"ffa-lora": True}},
    # each mode at its own best learning rate from the grid {0.005, 0.01, 0.02, 0.04} (docs/privacy.md):
    # federated 0.02 (the default), local-only 0.01 -- averaged updates tolerate a larger step
    "local-only DP (LoRA)": {"run_config": {"learning-rate": 0.01}, "local_only": True},
    "federated, no DP (LoRA)": {"run_config": {"dp": False}},
}


def main() -> None:
    """Run every mode and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--max-epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtune-utility-"))
    model, data = default_model(), default_data(3)
    results: dict[str, dict[str, Any]] = {}
    for i, (label, opts) in enumerate(MODES.items()):
        run_dir = out / f"mode{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        results[label] = simulate(
            run_dir, sites=3, rounds=args.rounds, model=model, data=data, max_epsilon=args.max_epsilon, **opts
        )
    sites = sorted(next(iter(results.values()))["sites"])
    print(f"\nheld-out loss after {args.rounds} rounds, max-epsilon {args.max_epsilon:g}\n")
    print("| mode | " + " | ".join(sites) + " | epsilon spent (max over sites) |")
    print("|---|" + "---|" * (len(sites) + 1))
    first = results[next(iter(results))]["sites"]
    before = " | ".join(f"{first[s]['eval_loss_before']:.3f}" for s in sites)
    print(f"| base model (before) | {before} | 0 |")
    for label, summary in results.items():
        row = summary["sites"]
        eps = [row[s].get("epsilon") for s in sites]
        spent = f"{max(e for e in eps if e is not None):.2f}" if any(e is not None for e in eps) else "no DP"
        after = " | ".join(f"{row[s]['eval_loss_after']:.3f}" for s in sites)
        print(f"| {label} | {after} | {spent} |")
    (out / "utility.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    fed, local = results["federated DP (LoRA)"]["sites"], results["local-only DP (LoRA)"]["sites"]
    wins = sum(fed[s]["eval_loss_after"] < local[s]["eval_loss_after"] for s in sites)
    print(f"\nfederated_dp_beats_local_only_at={wins}/{len(sites)}")


if __name__ == "__main__":
    main()
