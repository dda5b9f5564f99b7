"""The prepared GPU check: QLoRA + DP federated fine-tuning of a ~0.7B Llama on one GPU, measured.

Usage (one command, under 8 minutes on one H200; never needed by the tests)::

    bench/gpu_check.sh [--model DIR] [--device cuda] [--small] [--keep DIR]

1. **Model.** ``--model DIR`` or a random-init Llama built locally with the embedded tokenizer
   (hidden 1536, 20 layers, intermediate 4096, 1024 positions: about 0.6B parameters; one
   pretraining step, since weights do not change the cost).
2. **Federation.** ``fedtune simulate`` with 2 sites x 2 rounds, the sites' ``[compute]`` set to the
   device with a 4-bit NF4 base (QLoRA), once with DP and once without (``--no-dp``), same data;
   ``nvidia-smi`` is polled for the peak GPU memory of each run; the warm round (round 2) times
   are compared. Every site's epsilon must be within its budget.
3. **Steps.** ``bench/scale.py`` on the same model and device (4-bit base; sequence 512 x batch 8 and
   128 x 32): DP vs non-DP step time, tokens/s and peak memory, side by side.

The results replace the section between the ``gpu-check`` markers of ``docs/performance.md`` (and are
copied to ``$OUT`` when that is set).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"


class GpuMemoryPeak:
    """The highest ``memory.used`` nvidia-smi reports while the block runs (MiB; ``None`` without it)."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
            if values:
                self.peak = max(self.peak or 0.0, sum(values))
            self._stop.wait(0.25)

    def __enter__(self) -> GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build_model(out: Path, small: bool) -> Path:
    """A Llama-shaped model with the embedded tokenizer (``small``: the demo's tiny model)."""
    from embedded.tiny import TinySpec, build_tiny_model

    if small:
        return build_tiny_model(out, TinySpec(pretrain_steps=5))
    spec = TinySpec(
        hidden_size=1536,
        intermediate_size=4096,
        num_layers=20,
        num_heads=12,
        max_position=1024,
        pretrain_steps=1,
        batch_size=2,
    )
    return build_tiny_model(out, spec, progress=print)


def federate(model: Path, data: Path, out: Path, device: str, dp: bool, seq: int) -> dict[str, Any]:
    """2 sites x 2 rounds of 4-bit LoRA through ``fedtune simulate``; round times, epsilon, GPU peak."""
    from fedtune.simulate import simulate

    with GpuMemoryPeak() as gpu:
        summary = simulate(
            out,
            sites=2,
            rounds=2,
            model=model,
            data=data,
            run_config={"dp": dp, "max-seq-len": seq},
            compute={"device": device, "quantization": "nf4"},
        )
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    over = [s for s, row in summary["sites"].items() if dp and not row["epsilon"] <= row["max_epsilon"]]
    if summary["status"] != "completed" or over:
        raise SystemExit(f"the {'DP' if dp else 'non-DP'} run did not complete within budget: {summary}")
    return {
        "round2_s": times[1] - times[0],
        "wall_s": summary["wall_seconds"],
        "gpu_peak_mib": gpu.peak,
        "epsilon": {s: row.get("epsilon", float("nan")) for s, row in summary["sites"].items()},
    }


def step_table(model: Path, device: str, small: bool) -> str:
    """``bench/scale.py``'s side-by-side table on the same model and device (4-bit base)."""
    shapes = "128x4" if small else "512x8,128x32"
    cmd = [sys.executable, "-m", "bench.scale", "--model", str(model), "--device", device]
    cmd += ["--bases", "nf4", "--shapes", shapes, "--checkpointing", "off,on", "--quick"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"bench/scale.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|") or "worst_" in line]
    return "\n".join([*lines, "", *tokens_per_second(lines)])


def tokens_per_second(table: list[str]) -> list[str]:
    """Tokens/s DP vs non-DP from bench/scale.py's rows (batch x sequence / step time)."""
    out = ["| shape | checkpointing | tokens/s non-DP | tokens/s DP |", "|---|---|---|---|"]
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"\d+x\d+", cells[0]):
            seq, batch = (int(v) for v in cells[0].split("x"))
            tokens = seq * batch * 1e3  # per second: the columns are ms/step
            plain, dp = tokens / float(cells[3]), tokens / float(cells[4])
            out.append(f"| {cells[0]} | {cells[1]} | {plain:,.0f} | {dp:,.0f} |")
    return out


def render(model: Path, device: str, fed: dict[str, dict[str, Any]], steps: str, seconds: float) -> str:
    """The markdown section written into docs/performance.md."""
    import torch

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    params = sum(p.numel() for p in _meta_model(model).parameters()) / 1e6

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    dp, plain = fed["dp"], fed["plain"]
    lines = [
        START,
        f"Measured by `bench/gpu_check.sh` on {name} ({time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min): "
        f"a {params:,.1f}M-parameter Llama, 4-bit NF4 base, LoRA r16 on q_proj,v_proj.",
        "",
        "| federation (2 sites x 2 rounds, `fedtune simulate`) | DP | non-DP | DP / non-DP |",
        "|---|---|---|---|",
        f"| warm round (round 2), s | {dp['round2_s']:.1f} | {plain['round2_s']:.1f} | "
        f"{dp['round2_s'] / plain['round2_s']:.2f} |",
        f"| whole run, s | {dp['wall_s']:.0f} | {plain['wall_s']:.0f} | "
        f"{dp['wall_s'] / plain['wall_s']:.2f} |",
        f"| peak GPU memory (nvidia-smi, all processes), MiB | {mib(dp['gpu_peak_mib'])} | "
        f"{mib(plain['gpu_peak_mib'])} | - |",
        f"| epsilon per site (budget 8) | {', '.join(f'{e:.2f}' for e in dp['epsilon'].values())} | - | - |",
        "",
        "Training steps (`bench/scale.py`, same model and device); tokens/s = batch x sequence / step:",
        "",
        steps,
        END,
    ]
    return "\n".join(lines)


def _meta_model(model: Path) -> Any:
    """The model's architecture on the meta device (its parameter count, nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model)))


def write_doc(section: str) -> None:
    """Replace the marked section of docs/performance.md (append it if the markers are missing)."""
    text = DOC.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section + "\n"
    DOC.write_text(text, encoding="utf-8")
    if os.environ.get("OUT"):
        shutil.copy(DOC, Path(os.environ["OUT"]) / "performance.md")


def main(argv: list[str] | None = None) -> int:
    """Run the check and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an existing model folder (default: build ~0.6B)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (plumbing check only)")
    ap.add_argument("--small", action="store_true", help="the tiny model and small shapes (smoke test)")
    ap.add_argument("--keep", type=Path, help="keep the runs and model here (default: a temp folder)")
    ap.add_argument("--no-doc", action="store_true", help="print the table without writing the docs")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    from embedded.synthdata import write_synthetic_sites

    work = args.keep or Path(tempfile.mkdtemp(prefix="fedtune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(work / "model", args.small)
    data = work / "data"
    if not data.is_dir():
        write_synthetic_sites(data, sites=2, records_per_site=120, seed=1)
    fed = {}
    for kind, dp in (("dp", True), ("plain", False)):
        shutil.rmtree(work / kind, ignore_errors=True)
        fed[kind] = federate(model, data, work / kind, args.device, dp, 128 if args.small else 512)
        print(kind, json.dumps(fed[kind]), flush=True)
    section = render(
        model, args.device, fed, step_table(model, args.device, args.small), time.perf_counter() - start
    )
    print(section)
    if not args.no_doc:
        write_doc(section)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
