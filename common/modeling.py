"""Load a causal LM from a local folder, wrap it with LoRA, move adapter state around.

Sites are often air-gapped: everything loads from local folders with the Hugging Face
hub switched off. Any causal LM that ``from_pretrained`` can read drops in unchanged.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import LoraSpec
from common.errors import ConfigError
from common.fsutil import hash_file_into

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": "",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def set_offline_env() -> None:
    """Switch off every hub/network lookup and progress bars before heavy imports (idempotent)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # PEFT calls a transformers property that transformers 5 deprecates; nothing for us to fix.
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def check_model_dir(path: str | Path, key: str) -> Path:
    """Return ``path`` as a model folder or raise ``ConfigError`` naming ``key``."""
    p = Path(path).expanduser()
    if not str(path):
        raise ConfigError(key, [f"'{key}' is empty: point it at a local model folder"])
    if not (p / "config.json").is_file():
        raise ConfigError(
            key,
            [
                f"'{key}' = '{p}' is not a model folder (no config.json). Build the embedded one "
                "with `fedtune model tiny --out DIR` or copy a Hugging Face model folder there"
            ],
        )
    return p


def model_fingerprint(path: str | Path) -> str:
    """SHA-256 over the model's config and weight files (names and bytes).

    Coordinator and sites compare it to be sure they fine-tune the same base model.
    """
    p = Path(path)
    digest = hashlib.sha256()
    names = ["config.json", *sorted(f.name for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES)]
    for name in names:
        digest.update(name.encode())
        hash_file_into(digest, p / name)
    return digest.hexdigest()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder; pad token falls back to EOS."""
    set_offline_env()
    from transformers import AutoTokenizer

    _quiet_transformers()

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(path: str | Path, **options: Any) -> PreTrainedModel:
    """Load a causal LM from a local folder (float32 on CPU unless ``options`` say otherwise).

    ``options`` go to ``from_pretrained`` (``dtype``, ``quantization_config``, ``device_map``).
    """
    set_offline_env()
    from transformers import AutoModelForCausalLM

    _quiet_transformers()

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **options)


def meta_peft_model(path: str | Path, spec: LoraSpec) -> PeftModel:
    """The model of folder ``path`` wrapped with LoRA, built from its config alone on the meta device.

    No weight is read or allocated: what the coordinator needs (adapter keys and shapes, PEFT's
    adapter config) without the base model's memory (28 GB for a 7B model in float32).
    """
    set_offline_env()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    base.name_or_path = str(path)  # what the adapter config names as its base (as from_pretrained sets)
    return make_peft_model(base, spec)


def base_bytes(model: PeftModel) -> int:
    """Bytes of the base model's weights in the precision its config declares (float32 if none)."""
    import torch

    dtype = getattr(model.get_base_model().config, "dtype", None)
    size = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) * size


def materialize_adapter(model: PeftModel) -> None:
    """Give a ``meta_peft_model``'s LoRA tensors CPU storage (uninitialised; the base stays on meta)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.adapter_layer_names:
                getattr(module, name).to_empty(device="cpu")


def fresh_adapter(model: PeftModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Round-0 adapter values of a ``meta_peft_model``: PEFT's LoRA init (B = 0), on the CPU, seeded."""
    import torch
    from peft.tuners.lora import LoraLayer

    materialize_adapter(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", init_lora_weights=True)
    return adapter_state(model)


def lora_config(spec: LoraSpec) -> Any:
    """The PEFT ``LoraConfig`` for ``spec``."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def make_peft_model(base: PreTrainedModel, spec: LoraSpec) -> PeftModel:
    """Wrap ``base`` with a fresh LoRA adapter; only adapter weights are trainable."""
    from peft import get_peft_model

    model = get_peft_model(base, lora_config(spec))
    if spec.ffa:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter weights only (PEFT's own key naming), detached CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights into ``model``; every key must match exactly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))  # key names only: no tensor copies
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ValueError(f"adapter keys differ: missing {missing}, unexpected {extra}")
    set_peft_model_state_dict(model, state)
