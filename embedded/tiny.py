"""Build the embedded tiny base model: a small Llama pretrained on generic synthetic English.

It lets every part of fedtune (LoRA, DP-SGD, federation) run offline on a CPU in seconds. The
corpus is templated *generic* text (everyday, business, science, general health), never clinical
notes, so fine-tuning on clinical notes visibly lowers the loss. The output directory loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and carries a ``fedtune-tiny.json`` manifest.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedded.tiny_corpus import generic_corpus  # re-exported: the corpus lived here before

MANIFEST_NAME = "fedtune-tiny.json"
FORMAT_VERSION = 2
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TinySpec:
    """Architecture and pretraining recipe of the tiny model.

    ``vocab_size`` is an upper bound: the BPE trainer stops when the corpus has no more merges.
    A cached model is reused only if the spec in its manifest equals the requested one.
    """

    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    max_position: int = 256
    corpus_sentences: int = 6000
    pretrain_steps: int = 300
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k}={v} must be > 0" for k, v in asdict(self).items() if k != "seed" and not v > 0]
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if self.seq_len > self.max_position:
            problems.append(f"seq_len={self.seq_len} exceeds max_position={self.max_position}")
        if self.vocab_size < 300:
            problems.append(f"vocab_size={self.vocab_size} must be >= 300 (256 bytes + specials)")
        if problems:
            raise ValueError("invalid TinySpec: " + "; ".join(problems))


def _train_tokenizer(corpus: list[str], spec: TinySpec) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    # add_bos_token makes the wrapper install a "<s> $A" post-processor, like Llama tokenizers.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=spec.max_position,
    )


def _pretrain(model: Any, stream: list[int], spec: TinySpec, progress: Callable[[str], None]) -> list[float]:
    """Run a short causal-LM pretraining loop on random windows; return every step's loss."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    n_windows = data.numel() - spec.seq_len
    if n_windows < 1:
        raise ValueError(f"corpus too small: {data.numel()} tokens for seq_len={spec.seq_len}")
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.pretrain_steps // 10)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    offsets = torch.arange(spec.seq_len)
    losses: list[float] = []
    model.train()
    for step in range(spec.pretrain_steps):
        batch = data[torch.randint(0, n_windows, (spec.batch_size,), generator=gen)[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == spec.pretrain_steps:
            progress(f"pretrain step {step + 1}/{spec.pretrain_steps} loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _write_model(out_dir: Path, spec: TinySpec, progress: Callable[[str], None]) -> dict[str, Any]:
    """Build the tokenizer and model and save them into the fresh directory ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    corpus = generic_corpus(spec.corpus_sentences, seed=spec.seed)
    tokenizer = _train_tokenizer(corpus, spec)
    stream: list[int] = []  # "<s> sentence </s>" for every sentence, concatenated
    for ids in tokenizer(corpus)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    progress(f"tokenizer trained: {len(tokenizer)} tokens, corpus {len(stream)} tokens")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Fork the global RNG so that seeding here never leaks into the caller (e.g. DP noise).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        progress(f"model initialised: {n_params} parameters")
        losses = _pretrain(model, stream, spec, progress)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-10:]
    manifest = {
        "format": FORMAT_VERSION,
        "spec": asdict(spec),
        "param_count": n_params,
        "vocab_size": len(tokenizer),
        "train_tokens": len(stream),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),  # mean of the last 10 steps
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    # Written last: its presence marks a complete directory.
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """Return the ``fedtune-tiny.json`` manifest of ``model_dir``; None if absent or unreadable."""
    try:
        data = json.loads((Path(model_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(model_dir: Path, spec: TinySpec) -> bool:
    """Whether ``model_dir`` holds a finished build of exactly ``spec``."""
    manifest = read_manifest(model_dir) or {}
    return (
        manifest.get("format") == FORMAT_VERSION
        and manifest.get("spec") == asdict(spec)
        and all((model_dir / name).is_file() for name in _REQUIRED_FILES)
    )


def build_tiny_model(
    out_dir: Path, spec: TinySpec = TinySpec(), *, progress: Callable[[str], None] | None = None
) -> Path:
    """Build the tiny model into ``out_dir`` atomically.

    Everything is written into a temporary sibling directory that replaces ``out_dir`` only
    once complete, so a crash never leaves a half-written model behind.

    Parameters
    ----------
    out_dir
        Target directory; if it exists it must be empty or a previous tiny-model build.
    spec
        Architecture and pretraining recipe.
    progress
        Optional callback receiving short human-readable progress lines.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    FileExistsError
        If ``out_dir`` exists and is neither an empty directory nor a tiny-model build.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (read_manifest(out_dir) or not any(out_dir.iterdir()))):
        raise FileExistsError(f"{out_dir}: exists and is not a fedtune tiny-model directory; remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir, old_dir = (out_dir.with_name(f".{out_dir.name}.{kind}-{tag}") for kind in ("tmp", "old"))
    tmp_dir.mkdir()
    try:
        _write_model(tmp_dir, spec, progress or (lambda _msg: None))
        if out_dir.exists():  # os.replace cannot overwrite a non-empty directory
            os.replace(out_dir, old_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        if old_dir.exists() and not out_dir.exists():  # the swap failed halfway: restore
            os.replace(old_dir, out_dir)
        for leftover in (tmp_dir, old_dir):
            shutil.rmtree(leftover, ignore_errors=True)
    return out_dir


def ensure_tiny_model(cache_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Return a tiny-model directory for ``spec``, building it only when needed.

    A complete build in ``cache_dir`` whose manifest spec equals ``spec`` is reused; otherwise
    the model is (re)built. Concurrent callers are serialised by an ``fcntl`` lock file next to
    ``cache_dir`` (``.<name>.lock``), so only one of them builds.

    Parameters
    ----------
    cache_dir
        Directory that holds (or will hold) the model itself.
    spec
        Required architecture and recipe.

    Returns
    -------
    Path
        ``cache_dir``, ready for ``from_pretrained``.
    """
    cache_dir = Path(cache_dir)
    if _is_complete(cache_dir, spec):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.with_name(f".{cache_dir.name}.lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        if not _is_complete(cache_dir, spec):  # another process may have built it meanwhile
            build_tiny_model(cache_dir, spec)
    return cache_dir
