"""LoRA models for the gradient tests: the site's own loading path, with a non-zero adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from client.compute import Compute, load_base, prepare_for_dp
from common.config import LoraSpec
from common.modeling import make_peft_model

LORA = LoraSpec(rank=4, alpha=8, targets="q_proj,v_proj,down_proj")  # down_proj: out 64, in 172
SETTINGS = {
    "fp32": Compute("cpu", "float32", "none", False, None),
    "bf16-base": Compute("cpu", "bfloat16", "none", False, None),
    "nf4-base": Compute("cpu", "float32", "nf4", False, None),
    "int8-base": Compute("cpu", "float32", "int8", False, None),
    "checkpointing": Compute("cpu", "float32", "none", True, None),
    "nf4-checkpointing": Compute("cpu", "bfloat16", "nf4", True, None),
}
"""Every compute setting that runs on CPU."""


def lora_model(tiny_model: Path, compute: Compute = SETTINGS["fp32"], seed: int = 3) -> Any:
    """The site's own path: base under ``compute``, LoRA, DP preparation; lora_B non-zero; training mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = prepare_for_dp(make_peft_model(load_base(tiny_model, compute), LORA), compute)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
    model.train()
    return model
