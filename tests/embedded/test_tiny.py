"""Tests for the embedded tiny base model (embedded/tiny.py)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from embedded import tiny
from embedded.tiny import (
    MANIFEST_NAME,
    TinySpec,
    build_tiny_model,
    ensure_tiny_model,
    generic_corpus,
    read_manifest,
)

# Small enough to build in a few seconds, large enough for the loss to fall clearly.
FAST_SPEC = TinySpec(corpus_sentences=2000, pretrain_steps=60)
# Smallest useful build, for the cache/rebuild tests that only care about files.
MICRO_SPEC = TinySpec(vocab_size=400, corpus_sentences=300, pretrain_steps=3, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model shared by the read-only tests of this module."""
    messages: list[str] = []
    out = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", FAST_SPEC, progress=messages.append)
    assert any("pretrain step 60/60" in m for m in messages)
    return out


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Wrap ``tiny.build_tiny_model`` so each call is recorded; return the record."""
    calls: list[Path] = []
    real = tiny.build_tiny_model
    lock = threading.Lock()

    def counting(out_dir: Path, spec: TinySpec, **kwargs: Any) -> Path:
        with lock:
            calls.append(out_dir)
        return real(out_dir, spec, **kwargs)

    monkeypatch.setattr(tiny, "build_tiny_model", counting)
    return calls


def test_generic_corpus_is_deterministic_and_generic() -> None:
    a, b, c = generic_corpus(500, seed=3), generic_corpus(500, seed=3), generic_corpus(500, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 500 and len(set(a)) > 450
    text = " ".join(a).lower()
    # General medical reference text is in (as in any web-scale corpus), but never the
    # sites' clinical-note styles, which fine-tuning must be the one to teach.
    for note_style in (
        "discharge note.",
        "tumor board",
        "infusion visit",
        "clinic visit",
        "triage",
        "summarize the cardiology note",
        "well-child",
    ):
        assert note_style not in text
    assert generic_corpus(0) == []
    with pytest.raises(ValueError):
        generic_corpus(-1)


@pytest.mark.parametrize(
    "bad",
    [{"hidden_size": 66}, {"seq_len": 512}, {"pretrain_steps": 0}, {"vocab_size": 100}],
)
def test_spec_rejects_invalid_values(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="invalid TinySpec"):
        TinySpec(**bad)


def test_build_reloads_offline_with_auto_classes(built: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(built, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.vocab_size == len(tok) <= FAST_SPEC.vocab_size
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert (built / "model.safetensors").is_file()
    batch = tok(["It was a sunny day."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], cfg.vocab_size)


def test_pretraining_loss_fell(built: Path) -> None:
    manifest = read_manifest(built)
    assert manifest is not None
    assert manifest["spec"] == tiny.asdict(FAST_SPEC)
    assert manifest["param_count"] > 100_000
    assert manifest["final_loss"] < 0.6 * manifest["first_loss"]


def test_tokenizer_round_trips_text(built: Path) -> None:
    tok = AutoTokenizer.from_pretrained(built, local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for text in ("The patient, aged 71, reported chest pain at 03:00!", "Revenue rose by 12 percent.", "ü €"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_lora_on_q_and_v_proj_trains(built: Path) -> None:
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(built, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(built, local_files_only=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    lora.train()
    batch = tok(["Doctors say that sleep is good for the heart."], return_tensors="pt")
    lora(**batch, labels=batch["input_ids"]).loss.backward()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    assert all(p.grad is not None for n, p in lora.named_parameters() if n in trainable)


def test_ensure_reuses_a_matching_cache(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache" / "tiny"
    shutil.copytree(built, cache)
    before = (cache / MANIFEST_NAME).stat().st_mtime_ns
    calls = _count_builds(monkeypatch)
    assert ensure_tiny_model(cache, FAST_SPEC) == cache
    assert ensure_tiny_model(cache, FAST_SPEC) == cache
    assert calls == []
    assert (cache / MANIFEST_NAME).stat().st_mtime_ns == before


def test_ensure_builds_when_missing_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_builds(monkeypatch)
    cache = tmp_path / "nested" / "tiny"
    ensure_tiny_model(cache, MICRO_SPEC)
    ensure_tiny_model(cache, MICRO_SPEC)
    assert calls == [cache]
    assert read_manifest(cache) is not None


def test_ensure_rebuilds_on_spec_mismatch(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "tiny"
    shutil.copytree(built, cache)
    calls = _count_builds(monkeypatch)
    ensure_tiny_model(cache, MICRO_SPEC)
    assert calls == [cache]
    manifest = read_manifest(cache)
    assert manifest is not None and manifest["spec"] == tiny.asdict(MICRO_SPEC)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]  # no tmp/old leftovers


def test_ensure_rebuilds_an_incomplete_cache(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "tiny"
    shutil.copytree(built, cache)
    (cache / "model.safetensors").unlink()
    calls = _count_builds(monkeypatch)
    ensure_tiny_model(cache, MICRO_SPEC)
    assert calls == [cache] and (cache / "model.safetensors").is_file()


def test_concurrent_ensure_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_builds(monkeypatch)
    cache = tmp_path / "tiny"
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            ensure_tiny_model(cache, MICRO_SPEC)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert calls == [cache]


def test_failed_build_leaves_previous_model_intact(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "tiny"
    shutil.copytree(built, target)
    before = sorted(p.name for p in target.iterdir())

    def crash(*args: Any, **kwargs: Any) -> list[float]:
        raise RuntimeError("simulated crash during pretraining")

    monkeypatch.setattr(tiny, "_pretrain", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_tiny_model(target, MICRO_SPEC)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # temp dir cleaned up
    manifest = read_manifest(target)
    assert manifest is not None and manifest["spec"] == tiny.asdict(FAST_SPEC)


def test_build_refuses_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "notes.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not a fedtune tiny-model directory"):
        build_tiny_model(foreign, MICRO_SPEC)
    assert (foreign / "notes.jsonl").is_file()
