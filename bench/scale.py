"""DP-SGD overhead at a realistic shape: step time and peak memory, DP vs non-DP, side by side.

Usage::

    .venv/bin/python -m bench.scale [--quick] [--shapes 512x8,128x32] [--bases fp32,nf4]
        [--checkpointing off,on] [--reps 3] [--device cpu|cuda] [--model DIR]

(run from the repository root, as a module of the ``bench`` package.)

A random-init Llama of about 58M parameters (vocab 32000, hidden 512, intermediate 1376, 8 layers, 8
heads, 8 KV heads) is saved with ``save_pretrained`` into a temporary folder (or ``--model DIR`` is
used instead). Every configuration -- sequence x batch, gradient checkpointing off/on, base float32 or
4-bit NF4 (bitsandbytes) -- loads the model twice the way a site does (``client.compute.load_base``,
``make_peft_model`` with LoRA r=16, alpha=32 on q_proj/v_proj, ``prepare_for_dp``): one copy trained
by ``client.train.DPStepper`` (hooks mode: per-record gradients, clipping, noise, AdamW), one by plain
AdamW on the mean of ``per_sample_loss``. Batches are random token ids in [3, vocab), every record
the full sequence length, a fixed batch size; both kinds see the same batch.

Step time: as in ``bench/dp_overhead.py``, the DP and plain steps are interleaved batch by batch (the
order alternating) after a warm-up pair (full batch; with ``--quick`` on CPU a 1-record batch of the
same length, which covers the one-time costs at a fraction of the time); the time ratio is the median
over the timed pairs of the DP step's time over the plain step's time on the same batch moments apart,
so drifting machine load cancels. The ms/step columns are the medians of each kind. Default: 3 timed
pairs; ``--quick``: 2. Torch uses as many threads as the process may run on (``--threads``).

Peak memory: each configuration runs in its own fresh subprocess with glibc told to ``mmap`` every
allocation >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave RSS at once. Around every
timed step the peak RSS (``VmHWM``) is reset through ``/proc/self/clear_refs``; the step's figure is
its peak RSS minus the RSS just before it (activations, gradients, per-record gradients, optimizer
work). With ``--device cuda`` it is ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``
before the step. The reported figure is the median over the timed steps of each kind. Unlike
``bench/dp_overhead.py`` (one fresh process per kind), both kinds share the process, which halves the
cost; the worker can run one kind alone (``"kinds": ["dp"]``) to cross-check.

Goal (``docs/performance.md``): DP step time <= 1.15x and peak memory <= 1.2x of non-DP at every
shape. The last line is ``worst_time_ratio=<x> worst_memory_ratio=<y>`` over all configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.dp_overhead import _status_kib, _sync
from client.compute import Compute, load_base, prepare_for_dp
from client.train import DPPlan, DPStepper, per_sample_loss
from common.config import LoraSpec, default_run_config

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSpec(rank=16, alpha=32, targets="q_proj,v_proj")
ARCH: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 1024,
}
_RUN = default_run_config()


@dataclass(frozen=True)
class Shape:
    """One configuration: model folder, sequence x batch, checkpointing, base precision, device."""

    model_dir: str
    seq: int
    batch: int
    checkpointing: bool
    base: str  # "fp32" or "nf4"
    device: str
    reps: int
    threads: int
    warmup_batch: int  # records in the warm-up pair's batch

    def label(self) -> tuple[str, str, str]:
        """The table's shape, checkpointing and base cells."""
        return f"{self.seq}x{self.batch}", "on" if self.checkpointing else "off", self.base


def build_model(folder: Path) -> Path:
    """Save a random-init Llama of the benchmark's architecture (safetensors) into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**ARCH)).save_pretrained(folder)
    return folder


def load_lora(shape: Shape) -> torch.nn.Module:
    """The LoRA model as a site loads it under this shape's compute plan, in training mode."""
    from common.modeling import make_peft_model

    quant = "nf4" if shape.base == "nf4" else "none"
    compute = Compute(shape.device, "float32", quant, shape.checkpointing, None)
    model = prepare_for_dp(make_peft_model(load_base(shape.model_dir, compute), LORA), compute)
    model.train()
    return model


class Kind:
    """One kind of training step ('plain' or 'dp') on its own copy of the model."""

    def __init__(self, name: str, shape: Shape) -> None:
        self.name = name
        self.model = load_lora(shape)
        lr = float(_RUN["learning-rate"])
        self.dp: DPStepper | None = None
        if name == "dp":
            plan = DPPlan(1.0, 0.01, 10, float(_RUN["max-grad-norm"]), shape.batch)
            noise = torch.Generator(device=shape.device).manual_seed(7)  # benchmark only: not private
            self.dp = DPStepper(self.model, plan, learning_rate=lr, noise_generator=noise)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """One full training step on the batch."""
        if self.dp is not None:
            self.dp.step(ids, mask)
            return
        loss = per_sample_loss(self.model, ids, mask).mean()
        loss.backward()
        float(loss.detach())  # the DP path reads the loss too
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _memory_now(device: str) -> int:
    """Bytes in use now, and the peak counter reset to it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    rss = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM (peak RSS) to the current RSS
        fh.write("5")
    return rss


def _memory_peak(device: str) -> int:
    """Peak bytes since the last :func:`_memory_now`."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def worker(shape: Shape, kinds: list[str]) -> dict[str, Any]:
    """In a fresh process: interleaved steps of ``kinds``; per-step seconds and peak MB of each."""
    torch.set_num_threads(shape.threads)
    trainers = [Kind(k, shape) for k in kinds]
    vocab = int(json.loads((Path(shape.model_dir) / "config.json").read_text())["vocab_size"])
    gen = torch.Generator().manual_seed(1234)
    secs: dict[str, list[float]] = {k: [] for k in kinds}
    peak_mb: dict[str, list[float]] = {k: [] for k in kinds}
    base_mb = _memory_now(shape.device) / 2**20
    for i in range(1 + shape.reps):  # pair 0 is warm-up
        rows = shape.warmup_batch if i == 0 else shape.batch
        ids = torch.randint(3, vocab, (rows, shape.seq), generator=gen).to(shape.device)
        mask = torch.ones_like(ids)
        for tr in trainers if i % 2 == 0 else trainers[::-1]:
            before = _memory_now(shape.device)
            t0 = time.perf_counter()
            tr.step(ids, mask)
            _sync(shape.device)
            elapsed = time.perf_counter() - t0
            if i > 0:
                secs[tr.name].append(elapsed)
                peak_mb[tr.name].append((_memory_peak(shape.device) - before) / 2**20)
    for tr in trainers:
        if tr.dp is not None:
            tr.dp.close()
    return {"secs": secs, "peak_mb": peak_mb, "base_mb": base_mb}


def run_worker(shape: Shape, kinds: list[str]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh subprocess (mmap threshold set); its result or ``{'error': ...}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    arg = json.dumps({"shape": asdict(shape), "kinds": kinds})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--worker", arg],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Median ms/step and peak MB of each kind, the paired time ratio and the memory ratio."""
    secs, peak = result["secs"], result["peak_mb"]
    plain_mb, dp_mb = statistics.median(peak["plain"]), statistics.median(peak["dp"])
    return {
        "plain_ms": statistics.median(secs["plain"]) * 1e3,
        "dp_ms": statistics.median(secs["dp"]) * 1e3,
        "time_ratio": statistics.median(d / p for d, p in zip(secs["dp"], secs["plain"], strict=True)),
        "plain_mb": plain_mb,
        "dp_mb": dp_mb,
        "mem_ratio": dp_mb / plain_mb if plain_mb > 0 else float("nan"),
    }


def _split(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {bad or 'empty list'}; choose from {', '.join(allowed or ())}")
    return items


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(s), int(b)) for s, b in (item.lower().split("x") for item in _split(text))]
    except ValueError:
        raise SystemExit(f"--shapes: expected SEQxBATCH[,SEQxBATCH...], got {text!r}") from None


def run(args: argparse.Namespace) -> tuple[float, float]:
    """Measure every configuration, print the table; return the worst time and memory ratios."""
    import opacus
    import transformers

    shapes = _shapes(args.shapes)
    bases = _split(args.bases, ("fp32", "nf4"))
    ckpts = [c == "on" for c in _split(args.checkpointing, ("off", "on"))]
    reps = args.reps or (2 if args.quick else 3)
    threads = args.threads or len(os.sched_getaffinity(0))
    warm_note = "1 record" if args.quick and args.device == "cpu" else "full batch"
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtune-scale-") as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "llama")
        with open(model_dir / "config.json") as fh:
            arch = json.load(fh)
        n_params = sum(
            p.numel()
            for p in load_lora(Shape(str(model_dir), 1, 1, False, "fp32", "cpu", 0, 1, 1)).parameters()
        )
        print(
            f"DP vs non-DP at scale: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"opacus {opacus.__version__}, device {args.device}, {threads} threads"
        )
        print(
            f"model {model_dir if args.model else '(random init)'}: {n_params / 1e6:.1f}M params incl. "
            f"LoRA r={LORA.rank} alpha={LORA.alpha} on {LORA.targets}; hidden {arch['hidden_size']}, "
            f"{arch['num_hidden_layers']} layers, vocab {arch['vocab_size']}; DP: hooks mode, clip "
            f"{_RUN['max-grad-norm']}, noise 1.0, AdamW lr {_RUN['learning-rate']}"
        )
        print(
            f"per configuration: one fresh process, 1 warm-up pair ({warm_note}) + {reps} timed pairs "
            "(DP and plain "
            "interleaved on the same batch); time ratio = median of paired ratios; peak = median over "
            "timed steps of "
            + ("max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM)")
            + " minus the level before the step\n"
        )
        print(
            "| shape (seq x batch) | checkpointing | base | plain ms/step | DP ms/step | time ratio "
            "| plain peak MB | DP peak MB | memory ratio |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        worst_t = worst_m = 0.0
        failures: list[str] = []
        for seq, batch in shapes:
            for ckpt in ckpts:
                for base in bases:
                    warm = 1 if args.quick and args.device == "cpu" else batch
                    shape = Shape(str(model_dir), seq, batch, ckpt, base, args.device, reps, threads, warm)
                    result = run_worker(shape, ["plain", "dp"])
                    cells = " | ".join(shape.label())
                    if "error" in result:
                        print(f"| {cells} | failed | failed | - | - | - | - |", flush=True)
                        failures.append(f"{cells}: {result['error']}")
                        continue
                    s = summarize(result)
                    worst_t, worst_m = max(worst_t, s["time_ratio"]), max(worst_m, s["mem_ratio"])
                    print(
                        f"| {cells} | {s['plain_ms']:.0f} | {s['dp_ms']:.0f} | {s['time_ratio']:.3f} "
                        f"| {s['plain_mb']:.1f} | {s['dp_mb']:.1f} | {s['mem_ratio']:.3f} |",
                        flush=True,
                    )
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    for failure in failures:
        print(f"FAILED {failure}")
    return worst_t, worst_m


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 timed pairs, on CPU a 1-record warm-up pair (default: 3, full)",
    )
    parser.add_argument("--reps", type=int, default=0, help="timed pairs per configuration (default 3)")
    parser.add_argument("--shapes", default="512x8,128x32", help="SEQxBATCH list (default 512x8,128x32)")
    parser.add_argument("--bases", default="fp32,nf4", help="base precisions: fp32, nf4")
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off, on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: usable CPUs)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--model", help="an existing model folder instead of the random-init Llama")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec: dict[str, Any] = json.loads(args.worker)
        print(json.dumps(worker(Shape(**spec["shape"]), list(spec["kinds"]))))
        return 0
    worst_t, worst_m = run(args)
    print(f"worst_time_ratio={worst_t:.3f} worst_memory_ratio={worst_m:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
