"""Utility of privacy and federation on the embedded benchmark, measured side by side in one run.

Runs the same 3 synthetic hospitals x R rounds several ways -- federated DP-LoRA, federated DP
FFA-LoRA (B only), local-only DP-LoRA (each site alone, same budget and schedule) and federated LoRA
without DP -- and prints held-out loss per site as a markdown table (docs/privacy.md quotes a run).
With ``--repeats N`` every mode runs N times (fresh, unpredictable DP noise each time) and each cell
shows the mean and the range.

Usage: ``python -m bench.utility [--rounds 12] [--repeats 1] [--modes fed,ffa,local,nodp] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fedtune.simulate import default_data, default_model, simulate

MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "fed": ("federated DP (LoRA)", {"run_config": {}}),
    "ffa": ("federated DP (FFA-LoRA)", {"run_config": {"ffa-lora": True}}),
    # each mode at its own best learning rate from the grid {0.005, 0.01, 0.02, 0.04} (docs/privacy.md):
    # federated 0.02 (the default), local-only 0.01 -- averaged updates tolerate a larger step
    "local": ("local-only DP (LoRA, lr 0.01)", {"run_config": {"learning-rate": 0.01}, "local_only": True}),
    "nodp": ("federated, no DP (LoRA)", {"run_config": {"dp": False}}),
}


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    """Run every mode and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument("--max-epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtune-utility-"))
    model, data = default_model(), default_data(3)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:  # modes interleaved, so drifting machine load hits them alike
            run_dir = out / f"{mode}-{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)
            opts = MODES[mode][1]
            summary = simulate(
                run_dir,
                sites=3,
                rounds=args.rounds,
                model=model,
                data=data,
                max_epsilon=args.max_epsilon,
                **opts,
            )
            results[mode].append(summary)
    first = results[modes[0]][0]["sites"]
    sites = sorted(first)
    loss = {m: {s: [r["sites"][s]["eval_loss_after"] for r in results[m]] for s in sites} for m in modes}
    print(
        f"\nheld-out loss after {args.rounds} rounds, max-epsilon {args.max_epsilon:g}, "
        f"{args.repeats} run(s) per mode\n"
    )
    print("| mode | " + " | ".join(sites) + " | epsilon spent (max over sites) |")
    print("|---|" + "---|" * (len(sites) + 1))
    print(
        "| base model (before) | "
        + " | ".join(f"{first[s]['eval_loss_before']:.3f}" for s in sites)
        + " | 0 |"
    )
    for mode in modes:
        eps = [r["sites"][s].get("epsilon") for r in results[mode] for s in sites]
        spent = f"{max(e for e in eps if e is not None):.2f}" if any(e is not None for e in eps) else "no DP"
        print(f"| {MODES[mode][0]} | " + " | ".join(_cell(loss[mode][s]) for s in sites) + f" | {spent} |")
    (out / "utility.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    if "fed" in modes and "local" in modes:
        wins = sum(statistics.mean(loss["fed"][s]) < statistics.mean(loss["local"][s]) for s in sites)
        worst = min(min(loss["local"][s]) - max(loss["fed"][s]) for s in sites)
        print(f"\nworst case over runs: local-only's best minus federated's worst = {worst:+.3f}")
        print(f"federated_dp_beats_local_only_at={wins}/{len(sites)}")


if __name__ == "__main__":
    main()
