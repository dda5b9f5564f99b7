"""DP-SGD overhead of local LoRA training: step time and peak memory, DP vs non-DP, side by side.

Usage::

    .venv/bin/python bench/dp_overhead.py [--reps 5] [--memory-reps 3] [--modes hooks,functorch,ghost]

Two tiny Llama models are built into a temporary folder: the demo's default architecture and one with
about 4x the parameters. On each, the same LoRA model (rank 8, alpha 16, q_proj/v_proj) is trained
with and without DP on the same Poisson batches (expected size 16 of 190 records, 150-220 tokens, max
sequence length 256: the demo's run-config defaults).

Step time: one process holds two copies of the LoRA model, one wrapped for DP-SGD by
``client.train.DPStepper``, one trained with plain AdamW on the same per-record loss. Their steps are
interleaved batch by batch (the order rotates every step) so that machine load hits both alike; the
first steps are warm-up and excluded. The reported ratio is the median, over all timed steps, of the
DP step's time divided by the plain step's time on the same batch moments earlier or later (a paired
design: drifting machine load cancels, bursts fall out of the median). The median round time (one
round = ``local-steps`` steps) of each kind and their ratio are printed as well.

Peak memory: every measurement runs in a fresh subprocess that trains one kind only. Linux's peak RSS
(``VmHWM``) is reset through ``/proc/self/clear_refs`` once the model is loaded, and the figure is the
peak RSS during training minus the RSS just before it (activations, gradients, per-sample gradients,
optimizer state). glibc is told to ``mmap`` every allocation >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so
freed tensors leave RSS at once and the peak tracks live memory rather than allocator caching. With
``--device cuda`` the figure is ``torch.cuda.max_memory_allocated`` instead. The last line is
``step_time_ratio=<x> memory_ratio=<y>`` for the demo's default configuration.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from client.train import DP_MODES, DPMode, DPPlan, DPStepper, per_sample_loss
from common.config import LoraSpec, default_run_config
from common.modeling import load_base_model, make_peft_model
from embedded.tiny import TinySpec, build_tiny_model

RECORDS = 190
MIN_TOKENS, MAX_TOKENS = 150, 220
WARMUP_STEPS = 3
_RUN = default_run_config()


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: the training hyper-parameters that matter for cost, and the model folder."""

    label: str
    model_dir: str
    # the demo's defaults (common/config.py), so the bench always measures what a run uses
    batch_size: int = _RUN["batch-size"]
    local_steps: int = _RUN["local-steps"]
    max_seq_len: int = _RUN["max-seq-len"]
    lora_rank: int = _RUN["lora-rank"]
    lora_alpha: int = _RUN["lora-alpha"]
    targets: tuple[str, ...] = tuple(_RUN["lora-targets"].split(","))
    learning_rate: float = _RUN["learning-rate"]
    max_grad_norm: float = _RUN["max-grad-norm"]
    noise_multiplier: float = 1.0
    device: str = "cpu"


SPECS = {
    "default": TinySpec(pretrain_steps=5, corpus_sentences=2000),
    "4x": TinySpec(
        hidden_size=128, intermediate_size=344, num_layers=5, pretrain_steps=5, corpus_sentences=2000
    ),
}


def _data(cfg: BenchConfig, vocab: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Synthetic records of the demo's lengths and the Poisson batches (index sets) both runs share."""
    gen = torch.Generator().manual_seed(1234)
    lengths = torch.randint(MIN_TOKENS, MAX_TOKENS + 1, (RECORDS,), generator=gen)
    mask = (torch.arange(cfg.max_seq_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(4, vocab, (RECORDS, cfg.max_seq_len), generator=gen) * mask
    q = cfg.batch_size / RECORDS
    batches = [(torch.rand(RECORDS, generator=gen) < q).nonzero().flatten() for _ in range(2000)]
    return ids, mask, [b for b in batches if b.numel() > 0]


def _lora_model(cfg: BenchConfig) -> tuple[torch.nn.Module, int, int]:
    base = load_base_model(cfg.model_dir)
    total = sum(p.numel() for p in base.parameters())
    model = make_peft_model(base, LoraSpec(cfg.lora_rank, cfg.lora_alpha, ",".join(cfg.targets))).to(
        cfg.device
    )
    model.train()
    return model, total, int(base.config.vocab_size)


class _Trainer:
    """One kind of training step ('plain' or a DP mode) on its own copy of the model."""

    def __init__(self, kind: str, model: torch.nn.Module, cfg: BenchConfig) -> None:
        self.kind = kind
        self.model = model
        plan = DPPlan(
            cfg.noise_multiplier, cfg.batch_size / RECORDS, cfg.local_steps, cfg.max_grad_norm, cfg.batch_size
        )
        params = [p for p in model.parameters() if p.requires_grad]
        self.plain_opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        self.dp: DPStepper | None = None
        if kind != "plain":
            noise = torch.Generator(device=cfg.device).manual_seed(7)  # benchmark only: not private
            mode = cast(DPMode, kind)
            self.dp = DPStepper(
                model, plan, learning_rate=cfg.learning_rate, noise_generator=noise, mode=mode
            )

    def backward(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if self.dp is not None:
            self.dp.backward(ids, mask)
        else:
            loss = per_sample_loss(self.model, ids, mask).mean()
            loss.backward()
            float(loss.detach())  # the DP path reads the loss too

    def update(self) -> None:
        if self.dp is not None:
            self.dp.update()
        else:
            self.plain_opt.step()
            self.plain_opt.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_kinds(cfg: BenchConfig, kinds: list[str], reps: int) -> dict[str, dict[str, float]]:
    """Interleaved step timing of ``kinds`` on identical batches; medians over ``reps`` rounds."""
    model, _, vocab = _lora_model(cfg)
    ids, mask, batches = _data(cfg, vocab)
    ids, mask = ids.to(cfg.device), mask.to(cfg.device)
    trainers = [_Trainer(k, copy.deepcopy(model), cfg) for k in kinds]
    per_rep: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    n_steps = WARMUP_STEPS + reps * cfg.local_steps
    acc = {k: [0.0, 0.0] for k in kinds}
    step_s: dict[str, list[float]] = {k: [] for k in kinds}
    for i, sel in enumerate(batches[:n_steps]):
        b_ids, b_mask = ids[sel], mask[sel]
        shift = i % len(trainers)
        for tr in trainers[shift:] + trainers[:shift]:
            t0 = time.perf_counter()
            tr.backward(b_ids, b_mask)
            _sync(cfg.device)
            t1 = time.perf_counter()
            tr.update()
            _sync(cfg.device)
            t2 = time.perf_counter()
            if i >= WARMUP_STEPS:
                acc[tr.kind][0] += t1 - t0
                acc[tr.kind][1] += t2 - t1
                step_s[tr.kind].append(t2 - t0)
        if i >= WARMUP_STEPS and (i - WARMUP_STEPS + 1) % cfg.local_steps == 0:
            for k in kinds:
                per_rep[k].append((acc[k][0], acc[k][1]))
                acc[k] = [0.0, 0.0]
    for tr in trainers:
        if tr.dp is not None:
            tr.dp.close()
    out: dict[str, dict[str, float]] = {}
    for k, reps_k in per_rep.items():
        out[k] = {
            "step_ms": statistics.median(f + u for f, u in reps_k) / cfg.local_steps * 1e3,
            "fwd_bwd_ms": statistics.median(f for f, _ in reps_k) / cfg.local_steps * 1e3,
            "update_ms": statistics.median(u for _, u in reps_k) / cfg.local_steps * 1e3,
            # the headline: each step against the plain step on the same batch, moments apart
            "paired_ratio": statistics.median(
                a / b for a, b in zip(step_s[k], step_s[kinds[0]], strict=True)
            ),
        }
    return out


def poisson_loader_ms(cfg: BenchConfig) -> float:
    """Cost per batch of Opacus's Poisson ``DPDataLoader`` over the records, as ``train_dp`` uses it."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    ids, mask, _ = _data(cfg, 1000)
    loader = DPDataLoader(
        TensorDataset(ids, mask),
        sample_rate=cfg.batch_size / RECORDS,
        generator=torch.Generator().manual_seed(3),
    )
    n, t0 = 0, time.perf_counter()
    for _ in range(10):
        for _batch in loader:
            n += 1
    return (time.perf_counter() - t0) / n * 1e3


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        found = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(found.group(1))


def memory_worker(cfg: BenchConfig, kind: str) -> dict[str, float]:
    """In a fresh process: peak memory (MB) that training of one ``kind`` adds on top of the loaded model."""
    model, _, vocab = _lora_model(cfg)
    ids, mask, batches = _data(cfg, vocab)
    ids, mask = ids.to(cfg.device), mask.to(cfg.device)
    with torch.no_grad():  # start the intra-op thread pool before the baseline is read
        model(input_ids=ids[:2, :8], attention_mask=mask[:2, :8])
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM (peak RSS) to the current RSS
            fh.write("5")
    trainer = _Trainer(kind, model, cfg)
    for sel in batches[: WARMUP_STEPS + cfg.local_steps]:
        trainer.backward(ids[sel], mask[sel])
        trainer.update()
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"peak_mb": (peak - base) / 2**20, "base_mb": base / 2**20}


def measure_memory(cfg: BenchConfig, kinds: list[str], reps: int, threads: int) -> dict[str, float]:
    """Median training peak (MB) per kind over ``reps`` fresh subprocesses, kinds alternating."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    got: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(reps):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            arg = json.dumps({"cfg": asdict(cfg), "kind": kind, "threads": threads})
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", arg],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker ({kind}) failed:\n{proc.stderr[-2000:]}")
            got[kind].append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])
    return {k: statistics.median(v) for k, v in got.items()}


def _describe(cfg: BenchConfig, spec: TinySpec, total: int, trainable: int) -> str:
    return (
        f"[{cfg.label}] model {total / 1e6:.2f}M params (hidden {spec.hidden_size}, "
        f"{spec.num_layers} layers, {spec.num_heads} heads, intermediate {spec.intermediate_size}); "
        f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha} on {','.join(cfg.targets)} "
        f"({trainable:,} trainable); batch {cfg.batch_size} (expected, Poisson "
        f"q={cfg.batch_size / RECORDS:.4f} of {RECORDS} records); max-seq-len {cfg.max_seq_len} "
        f"(records {MIN_TOKENS}-{MAX_TOKENS} tokens, batches trimmed to their longest); "
        f"{cfg.local_steps} steps per round; clip {cfg.max_grad_norm}, noise {cfg.noise_multiplier}, "
        f"AdamW lr {cfg.learning_rate}"
    )


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[float, float]:
    """Run the benchmark; return the default configuration's (step-time ratio, memory ratio)."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in DP_MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(DP_MODES)}")
    primary = modes[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    import opacus

    log(
        f"DP overhead: torch {torch.__version__}, opacus {opacus.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} intra-op threads; DP mode for the ratios: {primary}"
    )
    log(
        f"step time: {args.reps} rounds, steps interleaved with the non-DP copy on the same batch "
        f"({WARMUP_STEPS} warm-up steps excluded), ratio = median of per-step paired ratios; "
        f"memory: median over {args.memory_reps} "
        "fresh processes per kind, peak "
        + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "RSS (VmHWM)")
        + " during training minus the level before it"
    )
    result: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as tmp:
        for label in ("default", "4x") if not args.default_only else ("default",):
            spec = SPECS[label]
            model_dir = build_tiny_model(Path(tmp) / label, spec)
            cfg = BenchConfig(label=label, model_dir=str(model_dir), device=args.device)
            model, total, _ = _lora_model(cfg)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            del model
            log(_describe(cfg, spec, total, trainable))
            times = time_kinds(cfg, ["plain", *modes], args.reps)
            plain = times["plain"]
            for kind in ["plain", *modes]:
                t = times[kind]
                log(
                    f"  step {kind:>9}: {t['step_ms']:8.1f} ms  (fwd+bwd {t['fwd_bwd_ms']:7.1f}, update "
                    f"{t['update_ms']:5.2f})  ratio of round medians {t['step_ms'] / plain['step_ms']:.3f}, "
                    f"median paired ratio {t['paired_ratio']:.3f}"
                )
            mem = measure_memory(cfg, ["plain", primary], args.memory_reps, torch.get_num_threads())
            m_ratio = mem[primary] / mem["plain"]
            log(
                f"  peak memory  plain {mem['plain']:.1f} MB  {primary} {mem[primary]:.1f} MB  "
                f"ratio {m_ratio:.3f}"
            )
            s_ratio = times[primary]["paired_ratio"]
            log(f"  => [{label}] step_time_ratio={s_ratio:.3f} memory_ratio={m_ratio:.3f}")
            result[label] = (s_ratio, m_ratio)
    log(
        f"Poisson DPDataLoader: {poisson_loader_ms(BenchConfig('loader', '')):.2f} ms per batch "
        "(not in the step times)"
    )
    return result["default"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=5, help="timed rounds of local-steps steps (default 5)")
    parser.add_argument(
        "--memory-reps", type=int, default=3, help="fresh processes per kind and size (default 3)"
    )
    parser.add_argument(
        "--modes",
        default="hooks",
        help="DP modes to time, first one gives the ratios (e.g. hooks,functorch,ghost)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--default-only", action="store_true", help="skip the 4x model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec: dict[str, Any] = json.loads(args.worker)
        torch.set_num_threads(int(spec["threads"]))
        cfg_fields = dict(spec["cfg"], targets=tuple(spec["cfg"]["targets"]))
        print(json.dumps(memory_worker(BenchConfig(**cfg_fields), spec["kind"])))
        return 0
    step_ratio, mem_ratio = run(args)
    print(f"step_time_ratio={step_ratio:.3f} memory_ratio={mem_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
